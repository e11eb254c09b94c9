// Markdown → safe HTML. The only path by which message text ever reaches innerHTML.
import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Same-origin paths and inline images only: a remote <img> would leak who reads the thread.
export const localImage = (href) => /^\/(?!\/)/.test(href) || /^data:image\//.test(href);

const md = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    // Raw HTML in a message is shown as the literal text someone typed, never as markup.
    html(token) {
      const text = escapeHtml(token.text ?? token.raw);
      return token.block ? `<p>${text}</p>` : text;
    },
    image(token) {
      if (localImage(token.href)) return false; // fall back to marked's own <img>
      return `<a href="${escapeHtml(token.href)}">${escapeHtml(token.text || token.href)}</a>`;
    },
  },
});

// Every link opens in a new tab without handing this page to the target.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

export function renderMarkdown(text) {
  const html = md.parse(text ?? "", { async: false });
  return DOMPurify.sanitize(html, { FORBID_ATTR: ["style"], FORBID_TAGS: ["style", "form"] });
}
