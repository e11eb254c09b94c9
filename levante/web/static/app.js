// Levante web app: boot, sign-in, header, client-side routing and the Spaces sidebar.
import { h, api, setCsrf, setUnauthorizedHandler, timeLabel, alertBox, showAlert } from "./dom.js";
import { mountSpace } from "./space.js";
import { mountModel } from "./model.js";

const topbar = document.getElementById("topbar");
const main = document.getElementById("app");
const NAME_KEY = "levante.name";
const STARTER_KEY = "levante.starter";

let me = null; // GET /web/api/me
let spaces = null; // cached list, so switching Spaces redraws the sidebar at once
let unmount = null; // closes the current view (its event stream, timers)
let modelInfo = null;
let shown = null; // path + query of the view on screen

const ctx = {
  get me() { return me; },
  displayName: () => localStorage.getItem(NAME_KEY)?.trim() || "",
  // The local workspace has no accounts: whoever posts, creates or notes says who they are.
  authored: (body = {}) => (me.mode === "local" && ctx.displayName() ? { ...body, author: ctx.displayName() } : body),
  modelInfo: () => (modelInfo ??= api("/model").catch((err) => { modelInfo = null; throw err; })),
  toggleNav: () => main.querySelector(".layout")?.classList.toggle("nav-open"),
};

const signedIn = () => me.mode === "local" || me.member != null;

// ---- routing ------------------------------------------------------------------------------------

function navigate(url) {
  history.pushState(null, "", url);
  route();
}

function route() {
  unmount?.();
  unmount = null;
  shown = location.pathname + location.search;
  document.title = "Levante";
  renderHeader();
  if (!signedIn()) return renderSignIn();
  const path = location.pathname;
  const spaceMatch = /^\/spaces\/([^/]+)\/?$/.exec(path);
  if (path === "/model") unmount = mountModel(main, ctx);
  else renderSpaces(spaceMatch ? safeDecode(spaceMatch[1]) : null);
}

/** A path segment as typed; a malformed escape (/spaces/%E0) is looked up as is and not found. */
function safeDecode(segment) {
  try { return decodeURIComponent(segment); } catch { return segment; }
}

// Same-origin links change the view without a page load; API links (exports) and new tabs do not.
document.addEventListener("click", (e) => {
  const a = e.target.closest("a[href]");
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  if (a.target || a.hasAttribute("download") || a.origin !== location.origin) return;
  if (a.pathname.startsWith("/web/") || a.pathname.startsWith("/static/")) return;
  e.preventDefault();
  navigate(a.pathname + a.search);
});
// Back/forward; a change of #fragment alone also fires popstate but is not a new view.
window.addEventListener("popstate", () => { if (location.pathname + location.search !== shown) route(); });

// ---- header -------------------------------------------------------------------------------------

function renderHeader() {
  const brand = h("a", { class: "brand", href: "/" }, h("span", { class: "brand-mark", "aria-hidden": "true" }, "≋"), h("span", { class: "brand-name" }, "Levante"));
  if (!signedIn()) return topbar.replaceChildren(brand);
  const here = location.pathname === "/model" ? "model" : "spaces";
  const navLink = (href, label, key) =>
    h("a", { href, class: `nav-link${here === key ? " active" : ""}`, "data-testid": `nav-${key}`, "aria-current": here === key ? "page" : null }, label);
  topbar.replaceChildren(
    brand,
    h("nav", { class: "nav" }, navLink("/", "Spaces", "spaces"), navLink("/model", "Model", "model")),
    h("div", { class: "who" }, me.mode === "local" ? nameField() : memberBadge()));
}

// Local mode has no accounts: the name typed here is sent as the author of each post.
function nameField() {
  const input = h("input", {
    class: "name-input", "data-testid": "display-name", "aria-label": "Your display name",
    placeholder: "Your name", maxlength: 60, value: ctx.displayName(),
  });
  const callout = h("p", { class: "name-callout", role: "status" }, "Pick a display name so your team knows who is talking.");
  const sync = () => {
    localStorage.setItem(NAME_KEY, input.value.trim());
    callout.hidden = Boolean(input.value.trim());
    input.classList.toggle("needs-name", !input.value.trim());
  };
  input.addEventListener("input", sync);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") input.blur(); });
  callout.hidden = Boolean(ctx.displayName());
  input.classList.toggle("needs-name", !ctx.displayName());
  return h("div", { class: "name-field" }, input, callout);
}

function memberBadge() {
  const signOut = async () => {
    try { await api("/session", "DELETE"); } catch { /* signed out already: show the form anyway */ }
    me = { ...me, member: null, csrf: null };
    setCsrf(null);
    route();
  };
  return [
    h("span", { class: "member" }, h("span", { class: "member-name" }, me.member.name ?? "Member"), h("span", { class: "member-team" }, me.member.team)),
    h("button", { type: "button", class: "btn btn-ghost btn-small", "data-testid": "sign-out", onclick: signOut }, "Sign out"),
  ];
}

// ---- sign-in ------------------------------------------------------------------------------------

function renderSignIn() {
  const key = h("input", { type: "password", id: "api-key", name: "key", autocomplete: "current-password", placeholder: "lv-…", "data-testid": "api-key", required: true });
  const error = alertBox("sign-in-error");
  const submit = h("button", { type: "submit", class: "btn btn-primary btn-wide", "data-testid": "sign-in" }, "Sign in");
  const onsubmit = async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      me = await api("/session", "POST", { key: key.value.trim() });
      setCsrf(me.csrf);
      route();
    } catch (err) {
      showAlert(error, err.message);
      submit.disabled = false;
    }
  };
  main.replaceChildren(h("div", { class: "signin" },
    h("form", { class: "card signin-card", onsubmit },
      h("span", { class: "brand-mark brand-mark--big", "aria-hidden": "true" }, "≋"),
      h("h1", {}, "Sign in to Levante"),
      h("p", { class: "muted" }, "Use the API key your team admin gave you. It is kept in a secure cookie, never in this page."),
      h("label", { for: "api-key" }, "API key"),
      key, error, submit)));
  key.focus();
}

// ---- Spaces: sidebar + the open Space (or a welcome) ----------------------------------------------

function renderSpaces(activeId) {
  const starterIndex = new URLSearchParams(location.search).get("starter");
  if (starterIndex !== null) sessionStorage.setItem(STARTER_KEY, starterIndex);

  const listEl = h("nav", { class: "space-list", "aria-label": "Spaces" });
  const content = h("div", { class: "content" });
  main.replaceChildren(h("div", { class: `layout${activeId ? " has-space" : ""}` },
    h("aside", { class: "sidebar" }, starterBanner(), newSpaceForm(), h("h2", { class: "sidebar-title" }, "Spaces"), listEl),
    content));

  const drawList = () => listEl.replaceChildren(...spaceLinks(activeId));
  if (spaces) drawList();
  api("/spaces").then((res) => { spaces = res.data; drawList(); }, (err) => listEl.replaceChildren(h("p", { class: "alert", role: "alert" }, err.message)));

  if (activeId) unmount = mountSpace(content, ctx, activeId);
  else content.replaceChildren(welcome());
}

function spaceLinks(activeId) {
  if (spaces.length === 0) return [h("p", { class: "muted small" }, "No Spaces yet. Create the first one above.")];
  return [...spaces].sort((a, b) => b.last_activity - a.last_activity).map((s) =>
    h("a", { href: `/spaces/${encodeURIComponent(s.id)}`, class: `space-link${s.id === activeId ? " active" : ""}`, "data-testid": "space-link", "aria-current": s.id === activeId ? "page" : null },
      h("span", { class: "space-link-title" }, s.title),
      h("span", { class: "space-link-meta" }, `${s.created_by} · ${timeLabel(s.last_activity)}`)));
}

function newSpaceForm() {
  const input = h("input", { class: "new-space-input", placeholder: "Name a new Space", "aria-label": "New Space title", maxlength: 120, "data-testid": "new-space-title" });
  const error = alertBox();
  const button = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "new-space" }, "Create");
  const onsubmit = async (e) => {
    e.preventDefault();
    if (!input.value.trim()) return input.focus();
    button.disabled = true;
    try {
      const space = await api("/spaces", "POST", ctx.authored({ title: input.value.trim() }));
      spaces = [space, ...(spaces ?? []).filter((s) => s.id !== space.id)];
      navigate(`/spaces/${encodeURIComponent(space.id)}`);
    } catch (err) {
      showAlert(error, err.message);
      button.disabled = false;
    }
  };
  return h("form", { class: "new-space", onsubmit }, h("div", { class: "new-space-row" }, input, button), error);
}

// Shown after "Open in a Space →" on the model page, until a Space is opened or it is dismissed.
function starterBanner() {
  const index = sessionStorage.getItem(STARTER_KEY);
  if (index === null) return null;
  const text = h("span", {}, "Pick a Space for this starter, or create one.");
  const banner = h("div", { class: "starter-banner", role: "status" }, text,
    h("button", {
      type: "button", class: "btn btn-ghost btn-small", "aria-label": "Dismiss starter",
      onclick: () => { sessionStorage.removeItem(STARTER_KEY); banner.remove(); },
    }, "Dismiss"));
  ctx.modelInfo().then((info) => {
    const starter = info.starters?.[Number(index)];
    if (starter) text.textContent = `Pick a Space for “${starter.title}” (or create one).`;
  }, () => {});
  return banner;
}

function welcome() {
  const model = me.model.name;
  const step = (n, title, text) => h("li", {}, h("span", { class: "step-n" }, n), h("div", {}, h("strong", {}, title), h("p", { class: "muted" }, text)));
  return h("div", { class: "welcome" },
    h("div", { class: "card welcome-card" },
      h("h1", {}, "Welcome to Spaces"),
      h("p", { class: "muted" }, "A Space is one shared thread for your team, with its own memory and a shared credit pool."),
      h("ol", { class: "steps" },
        step("1", "Open or create a Space", "Pick one on the left, or give a new one a title."),
        step("2", `Ask with @${model}`, "Mention the model in a message; the answer streams in for everyone."),
        step("3", "Pin what matters", "Notes in the Space's memory go with every question asked there.")),
      h("a", { class: "btn", href: "/model" }, `About ${model} →`)));
}

// ---- boot ---------------------------------------------------------------------------------------

setUnauthorizedHandler(() => {
  if (me?.mode !== "keys" || !me.member) return;
  me = { ...me, member: null };
  route();
});

try {
  me = await api("/me");
  setCsrf(me.csrf);
  route();
} catch (err) {
  main.replaceChildren(h("div", { class: "empty-state" },
    h("p", { class: "empty-title" }, "Levante is not reachable"),
    h("p", { class: "muted" }, err.message),
    h("button", { type: "button", class: "btn", onclick: () => location.reload() }, "Try again")));
}
