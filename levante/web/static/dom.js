// Small helpers shared by every view: element building, the JSON API, formatting.

/** h("a", {href, class, "data-testid": "x", onclick}, ...children). Strings become text nodes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c != null && c !== false));
  return el;
}

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let csrf = null;
let onUnauthorized = () => {};

export function setCsrf(token) {
  csrf = token;
}

/** Called when a signed-in request comes back 401 (revoked key, expired cookie). */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/** fetch("/web/api" + path) with CSRF and JSON; throws ApiError carrying the server's message. */
export async function api(path, method = "GET", body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const signingIn = method === "POST" && path === "/session";
  if (method !== "GET" && !signingIn && csrf) headers["X-CSRF-Token"] = csrf;
  const res = await fetch("/web/api" + path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 204) return null;
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    if (res.status === 401 && !signingIn) onUnauthorized();
    const err = data?.error ?? {};
    throw new ApiError(err.message || `Request failed (${res.status} ${res.statusText})`, res.status, err.code);
  }
  return data;
}

/** "$0.000021" for one cheap answer, "$0.0123" below a dollar, "$12.34" above. */
export function money(usd) {
  if (usd == null || Number.isNaN(usd)) return "—";
  const value = Number(usd);
  if (value !== 0 && Math.abs(value) < 0.0001) return "$" + value.toPrecision(2); // one answer: $0.000021
  return "$" + value.toFixed(Math.abs(value) < 1 ? 4 : 2);
}

export const count = (n) => Number(n).toLocaleString("en-US");

export function timeLabel(unixSeconds) {
  const d = new Date(unixSeconds * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleDateString([], { month: "short", day: "numeric" });
}

/** A coloured initial; the model gets the accent so its answers stand out. */
export function avatar(name, isModel = false) {
  const hue = [...(name ?? "?")].reduce((a, c) => (a * 31 + c.charCodeAt(0)) % 6, 0);
  return h("span", { class: `avatar ${isModel ? "avatar--model" : `avatar--c${hue}`}`, "aria-hidden": "true" },
    isModel ? "✦" : (name || "?").trim().charAt(0).toUpperCase() || "?");
}

export const alertBox = (testid) => h("div", { class: "alert", role: "alert", "data-testid": testid, hidden: true });

export function showAlert(box, message) {
  box.textContent = message ?? "";
  box.hidden = !message;
}
