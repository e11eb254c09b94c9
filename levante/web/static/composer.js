// The message composer: textarea with a popup completing @model and /tool names, image attachments, send.
import { h, avatar, alertBox, showAlert } from "./dom.js";

const readDataURL = (file) =>
  new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });

const WRENCH = "M14.7 6.3a4 4 0 00-5.3 5.3L4 17l3 3 5.4-5.4a4 4 0 005.3-5.3l-2.6 2.6-2.4-.6-.6-2.4z";

/** onSend({content, images}) must throw on failure: the draft then stays for another try. */
export function createComposer({ modelName, onSend }) {
  let images = []; // data: URLs waiting to be sent
  let tools = []; // [{name, hint}]: the tools `/name` can make the model call first
  let mentionDismissed = false; // Escape hides the popup until the next keystroke
  let choices = []; // what the popup offers now: [{text, label, hint, model}]
  let selected = 0;

  const textarea = h("textarea", {
    class: "composer-input", "data-testid": "composer", rows: 1, "aria-label": "Message",
    placeholder: `Message the Space — type @${modelName} to ask the model`,
  });
  const fileInput = h("input", { type: "file", accept: "image/*", multiple: true, hidden: true, "data-testid": "image-input" });
  const thumbs = h("div", { class: "thumbs", hidden: true });
  const error = alertBox("composer-error");
  const popup = h("div", { class: "mention-popup", role: "listbox", "data-testid": "mention-popup", hidden: true });
  const send = h("button", { type: "submit", class: "btn btn-primary send", "data-testid": "send", "aria-label": "Send" }, "Send");
  const attach = h("button", {
    type: "button", class: "btn btn-icon", title: "Attach images", "aria-label": "Attach images",
    onclick: () => fileInput.click(),
  }, icon("M21 12.5l-8.3 8.3a5.5 5.5 0 01-7.8-7.8l8.6-8.6a3.7 3.7 0 015.2 5.2l-8.6 8.6a1.8 1.8 0 01-2.6-2.6l8-8"));

  const form = h("form", { class: "composer", onsubmit: (e) => { e.preventDefault(); submit(); } },
    error, thumbs,
    h("div", { class: "composer-box" }, popup, attach, textarea, send),
    h("p", { class: "composer-hint" }, "Enter to send · Shift+Enter for a new line · paste or drop images"),
    fileInput);

  // The @name or /tool being typed right before the caret, and what it could still become.
  function completions() {
    const before = textarea.value.slice(0, textarea.selectionStart);
    const m = /(?:^|\s)([@/])([^\s@/]*)$/.exec(before);
    if (!m) return { query: "", found: [] };
    const query = m[2].toLowerCase();
    const found = m[1] === "@"
      ? (modelName.toLowerCase().startsWith(query) ? [{ text: `@${modelName}`, label: `@${modelName}`, hint: "model · Tab", model: true }] : [])
      : tools.filter((t) => t.name.toLowerCase().includes(query)).slice(0, 8)
        .map((t) => ({ text: `/${t.name}`, label: `/${t.name}`, hint: t.hint }));
    return { query: m[1] + m[2], found };
  }

  const popupOpen = () => !popup.hidden;
  function updatePopup() {
    const { found } = completions();
    if (found.map((c) => c.text).join() !== choices.map((c) => c.text).join()) selected = 0;
    choices = found;
    popup.hidden = mentionDismissed || choices.length === 0;
    popup.replaceChildren(...choices.map((c, i) => h("button", {
      type: "button", class: "mention-option", role: "option", "aria-selected": String(i === selected), "data-testid": "mention-option",
      onmousedown: (e) => e.preventDefault(), // keep the caret in the textarea
      onclick: () => { selected = i; accept(); },
    }, c.model ? avatar(modelName, true) : h("span", { class: "tool-mark" }, icon(WRENCH)),
    h("span", { class: "mention-name" }, c.label), h("span", { class: "mention-hint" }, c.hint))));
  }

  function accept() {
    const { query, found } = completions();
    popup.hidden = true;
    if (!found.length) return;
    const end = textarea.selectionStart;
    textarea.setRangeText(`${found[Math.min(selected, found.length - 1)].text} `, end - query.length, end, "end");
    textarea.focus();
  }

  function renderThumbs() {
    thumbs.hidden = images.length === 0;
    thumbs.replaceChildren(...images.map((url, i) =>
      h("div", { class: "thumb", "data-testid": "attachment" },
        h("img", { src: url, alt: `Attachment ${i + 1}` }),
        h("button", {
          type: "button", class: "thumb-remove", "aria-label": "Remove image", title: "Remove",
          onclick: () => { images.splice(i, 1); renderThumbs(); textarea.focus(); },
        }, "×"))));
  }

  async function addFiles(files) {
    const picked = [...files].filter((f) => f.type.startsWith("image/"));
    try {
      images.push(...(await Promise.all(picked.map(readDataURL))));
    } catch (err) {
      showAlert(error, `Could not read the image: ${err?.message ?? err}`);
    }
    renderThumbs();
  }

  async function submit() {
    const content = textarea.value.trim();
    if ((!content && images.length === 0) || send.disabled) return;
    send.disabled = true;
    showAlert(error, "");
    try {
      await onSend({ content, images: [...images] });
      textarea.value = "";
      images = [];
      renderThumbs();
    } catch (err) {
      showAlert(error, err.message); // the draft stays so nothing typed is lost
    } finally {
      send.disabled = false;
      textarea.focus();
    }
  }

  textarea.addEventListener("input", () => { mentionDismissed = false; updatePopup(); });
  textarea.addEventListener("click", updatePopup);
  textarea.addEventListener("blur", () => { popup.hidden = true; });
  textarea.addEventListener("keydown", (e) => {
    if (e.isComposing) return;
    if (popupOpen()) updatePopup(); // what it offers must match the text at the caret now
    if (popupOpen() && (e.key === "Tab" || e.key === "Enter")) {
      e.preventDefault();
      accept();
    } else if (popupOpen() && (e.key === "ArrowDown" || e.key === "ArrowUp")) {
      e.preventDefault();
      selected = (selected + (e.key === "ArrowDown" ? 1 : choices.length - 1)) % choices.length;
      updatePopup();
    } else if (popupOpen() && e.key === "Escape") {
      mentionDismissed = true;
      popup.hidden = true;
    } else if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      submit();
    }
  });
  textarea.addEventListener("keyup", (e) => {
    // the caret may have moved (arrows, Home, End…); Up and Down move within an open popup instead
    if (!(popupOpen() && (e.key === "ArrowUp" || e.key === "ArrowDown"))) updatePopup();
  });
  textarea.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.items ?? [])].filter((i) => i.kind === "file").map((i) => i.getAsFile());
    if (files.some((f) => f?.type.startsWith("image/"))) {
      e.preventDefault(); // otherwise some browsers also paste the file's name as text
      addFiles(files.filter(Boolean));
    }
  });
  fileInput.addEventListener("change", () => { addFiles(fileInput.files); fileInput.value = ""; });
  form.addEventListener("dragover", (e) => { e.preventDefault(); form.classList.add("dropping"); });
  form.addEventListener("dragleave", (e) => { if (!form.contains(e.relatedTarget)) form.classList.remove("dropping"); });
  form.addEventListener("drop", (e) => {
    e.preventDefault();
    form.classList.remove("dropping");
    addFiles(e.dataTransfer?.files ?? []);
  });

  return {
    el: form,
    setText(text) { textarea.value = text; textarea.focus(); },
    /** The tools `/name` completes: [{name, hint}]. */
    setTools(list) { tools = list; if (popupOpen()) updatePopup(); },
  };
}

/** A stroked 24×24 icon from one SVG path. */
export function icon(d) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", d);
  svg.append(path);
  return svg;
}
