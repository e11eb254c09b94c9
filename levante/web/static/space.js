// One open Space: the live thread (with the model's tool calls), the composer, the Space's memory,
// the MCP servers it enables and the credits pool.
import { h, api, money, count, timeLabel, avatar, alertBox, showAlert } from "./dom.js";
import { localImage, renderMarkdown } from "./markdown.js";
import { createComposer, icon } from "./composer.js";

const DOWNLOAD = "M12 4v11m0 0l-4.5-4.5M12 15l4.5-4.5M5 19.5h14";

/** Renders Space `id` into `root`; returns the function that closes it (and its event stream). */
export function mountSpace(root, ctx, id) {
  const base = `/spaces/${encodeURIComponent(id)}`;
  const messages = new Map(); // id → Message, the latest state we know
  const messageNodes = new Map();
  const notes = new Map();
  const noteNodes = new Map();
  const editing = new Set(); // note ids with an open editor: live updates must not wipe the draft
  const openCalls = new Set(); // tool calls whose details a member opened: re-renders keep them open
  let space = null;
  let servers = []; // the operator's MCP servers: [{label, state, error, tools}]
  let events = null;
  let retryTimer = null;
  let closed = false;

  const title = h("h1", { class: "space-title" }, "Loading…");
  const connection = h("span", { class: "connection", "data-testid": "connection", "data-state": "reconnecting" }, "connecting…");
  const list = h("div", { class: "messages", role: "log", "aria-live": "polite" });
  const emptyThread = h("div", { class: "empty-thread" },
    h("p", { class: "empty-title" }, "No messages yet"),
    h("p", {}, `Say hello, or type @${ctx.me.model.name} to ask the model. Everyone in the Space sees the answer stream in.`));
  const composer = createComposer({ modelName: ctx.me.model.name, onSend: post });
  const actionError = alertBox();
  const noteList = h("ul", { class: "notes" });
  const noteEmpty = h("p", { class: "muted small" }, "Nothing pinned yet. Notes here are shared with the model on every question in this Space.");
  const credits = creditsCard();
  const toolList = h("ul", { class: "tool-servers", "data-testid": "mcp-servers" });
  const toolNote = h("p", { class: "muted small" });
  const toolError = alertBox();

  root.replaceChildren(h("div", { class: "space" },
    h("section", { class: "thread", "aria-label": "Thread" },
      h("div", { class: "space-bar" },
        h("button", { type: "button", class: "btn btn-ghost only-phone", onclick: ctx.toggleNav }, "☰ Spaces"),
        title,
        h("div", { class: "space-tools" },
          connection,
          h("a", { class: "btn btn-ghost btn-small", href: `/web/api${base}/export.json`, download: true, "data-testid": "export-json", title: "Export as JSON" }, icon(DOWNLOAD), "JSON"),
          h("a", { class: "btn btn-ghost btn-small", href: `/web/api${base}/export.md`, download: true, "data-testid": "export-md", title: "Export as Markdown" }, icon(DOWNLOAD), "Markdown"),
          h("button", { type: "button", class: "btn btn-ghost btn-small only-phone", onclick: () => root.querySelector(".panel").scrollIntoView() }, "Memory"))),
      actionError,
      h("div", { class: "thread-scroll" }, emptyThread, list),
      composer.el),
    h("aside", { class: "panel", "aria-label": "Credits, tools and memory" },
      credits.el,
      h("section", { class: "card", "data-testid": "tools-card" },
        h("h2", {}, "Tools"),
        toolNote,
        toolList,
        toolError),
      h("section", { class: "card" },
        h("h2", {}, "Memory"),
        noteEmpty,
        noteList,
        noteForm()))));

  load().then(connect, showLoadError);

  // ---- loading and live updates -----------------------------------------------------------------

  async function load() {
    const data = await api(base);
    servers = data.mcp_servers;
    renderSpace(data.space);
    data.messages.forEach(upsertMessage);
    for (const nid of notes.keys()) if (!data.notes.some((n) => n.id === nid)) removeNote(nid);
    data.notes.forEach(upsertNote);
    credits.render(data.credits);
    fillStarter();
    scrollToEnd();
    return data.cursor;
  }

  function showLoadError(err) {
    if (closed) return;
    root.replaceChildren(h("div", { class: "empty-state" },
      h("p", { class: "empty-title" }, err.status === 404 ? "Space not found" : "Could not open this Space"),
      h("p", { class: "muted" }, err.message),
      h("a", { class: "btn", href: "/" }, "Back to Spaces")));
  }

  function connect(cursor) {
    if (closed) return;
    // The server replays what changed after `after`, so nothing falls between load and listen.
    events = new EventSource(`/web/api${base}/events?after=${cursor}`);
    events.onopen = () => setConnection(true);
    events.onerror = () => {
      setConnection(false);
      // A refused stream (e.g. signed out) is not retried by the browser: reload and listen again.
      if (events.readyState === EventSource.CLOSED) retryTimer = setTimeout(() => load().then(connect, () => connect(cursor)), 3000);
    };
    listen("message", upsertMessage);
    listen("delta", appendDelta);
    listen("note", upsertNote);
    listen("note_deleted", (d) => removeNote(d.id));
    listen("credits", credits.render);
    listen("space", renderSpace);
    listen("call", upsertCall);
  }

  function listen(type, handler) {
    events.addEventListener(type, (e) => handler(JSON.parse(e.data)));
  }

  function setConnection(open) {
    connection.dataset.state = open ? "open" : "reconnecting";
    connection.textContent = open ? "live" : "reconnecting…";
  }

  // A starter prompt picked on the model page waits in sessionStorage for the first Space opened.
  async function fillStarter() {
    const index = sessionStorage.getItem("levante.starter");
    if (index === null) return;
    sessionStorage.removeItem("levante.starter");
    const starter = (await ctx.modelInfo().catch(() => null))?.starters?.[Number(index)];
    if (starter && !closed) composer.setText(`@${ctx.me.model.name} ${starter.prompt}`);
  }

  // ---- the Space and its tools ------------------------------------------------------------------

  function renderSpace(fresh) {
    space = fresh;
    title.textContent = space.title;
    document.title = `${space.title} · Levante`;
    const canCall = ctx.me.model.tools;
    toolNote.textContent = !servers.length
      ? "No MCP servers are configured on this server (levante serve --mcp-config)."
      : canCall
        ? "Servers this Space enables: @-mentions may use their tools. Type / to make the model call one first."
        : `${ctx.me.model.name} has no tool-call format, so it cannot use these tools.`;
    toolList.replaceChildren(...servers.map(renderServer));
    const on = servers.filter((s) => space.mcp.includes(s.label));
    composer.setTools(canCall ? on.flatMap((s) => s.tools.map((t) => ({
      name: `${s.label}_${t.name}`.replace(/[^a-zA-Z0-9_-]/g, "_").slice(0, 64),
      hint: s.label,
    }))) : []);
  }

  function renderServer(server) {
    const enabled = space.mcp.includes(server.label);
    const box = h("input", {
      type: "checkbox", class: "tool-toggle", "data-testid": "mcp-toggle", "data-label": server.label,
      checked: enabled, "aria-label": `Enable ${server.label} in this Space`,
      onchange: async () => {
        box.disabled = true;
        showAlert(toolError, "");
        try { // one label at a time, merged by the server: members' changes never undo each other
          renderSpace(await api(base, "PATCH", box.checked ? { enable: [server.label] } : { disable: [server.label] }));
        } catch (err) {
          box.checked = enabled;
          showAlert(toolError, err.message);
        } finally {
          box.disabled = false;
        }
      },
    });
    const names = server.tools.map((t) => t.name).join(", ") || "no tools listed";
    return h("li", { class: "tool-server", "data-testid": "mcp-server", "data-label": server.label },
      h("label", { class: "tool-server-head" }, box,
        h("span", { class: "tool-server-name" }, server.label),
        h("span", { class: `badge badge--${{ ready: "up", failed: "error" }[server.state] ?? "plain"}`, title: server.error ?? "" }, server.state)),
      h("p", { class: "muted small tool-server-tools" }, names));
  }

  // ---- messages ---------------------------------------------------------------------------------

  async function post({ content, images }) {
    const { message, answer } = await api(`${base}/messages`, "POST", ctx.authored({ content, images }));
    upsertMessage(message);
    if (answer) upsertMessage(answer);
    scrollToEnd();
  }

  function upsertMessage(msg) {
    const stick = nearEnd();
    // A POST's reply can reach the page after the stream: one older than what the stream showed (the
    // answer done before its POST returned) is dropped; one as old as a streaming answer keeps the longer text.
    const prev = messages.get(msg.id);
    if (prev && prev.revision > msg.revision) return;
    if (prev?.status === "streaming" && msg.status === "streaming" && prev.content.startsWith(msg.content)) msg = { ...msg, content: prev.content };
    messages.set(msg.id, msg);
    const node = renderMessage(msg);
    placeById(list, messageNodes, msg.id, node);
    emptyThread.hidden = true;
    if (stick) scrollToEnd();
  }

  // Deltas re-render the whole partial answer (markdown needs it), at most once per frame.
  const pendingBodies = new Set();
  // Each delta says where it starts: overlap (the page loaded mid-answer) is trimmed; a gap (a
  // delta missed while reconnecting) is filled by reloading the Space, which holds the text so far.
  function appendDelta({ id: mid, offset, text }) {
    const msg = messages.get(mid);
    if (!msg) return;
    const have = msg.content.length;
    if (offset > have) return void load().catch(() => {});
    if (offset + text.length <= have) return;
    msg.content += text.slice(have - offset);
    if (pendingBodies.size === 0) requestAnimationFrame(flushBodies);
    pendingBodies.add(mid);
  }

  function flushBodies() {
    const stick = nearEnd();
    for (const mid of pendingBodies) {
      const body = messageNodes.get(mid)?.querySelector("[data-testid=message-body]");
      if (body) body.innerHTML = renderMarkdown(messages.get(mid).content);
    }
    pendingBodies.clear();
    if (stick) scrollToEnd();
  }

  // A tool call starting or ending while the answer streams.
  function upsertCall({ id: mid, call }) {
    const msg = messages.get(mid);
    if (!msg) return;
    const calls = msg.tool_calls ?? [];
    const at = calls.findIndex((c) => c.id === call.id);
    msg.tool_calls = at < 0 ? [...calls, call] : calls.map((c, i) => (i === at ? call : c));
    upsertMessage(msg);
  }

  function renderCall(call) {
    const status = { in_progress: "running…", completed: "done", failed: "failed" }[call.status] ?? call.status;
    const took = call.duration != null ? ` · ${call.duration.toFixed(2)} s` : "";
    let args = call.arguments;
    try { args = JSON.stringify(JSON.parse(call.arguments), null, 2); } catch { /* shown as sent */ }
    const pictures = (call.images ?? []).filter((u) => u.startsWith("data:image/"));
    return h("details", {
      class: `tool-call tool-call--${call.status}`, "data-testid": "tool-call", "data-status": call.status,
      open: openCalls.has(call.id),
      ontoggle: (e) => (e.target.open ? openCalls.add(call.id) : openCalls.delete(call.id)),
    },
    h("summary", {},
      h("span", { class: "tool-call-name", "data-testid": "tool-call-name" }, `${call.server_label} · ${call.name}`),
      h("span", { class: "tool-call-status" }, status + took)),
    h("p", { class: "tool-call-label" }, "Arguments"),
    h("pre", { class: "tool-call-text", "data-testid": "tool-call-arguments" }, args),
    call.status === "in_progress" ? null : h("p", { class: "tool-call-label" }, call.error != null ? "Error" : "Result"),
    call.status === "in_progress" ? null : h("pre", { class: "tool-call-text", "data-testid": "tool-call-result" }, call.error ?? call.output ?? ""),
    pictures.length ? h("div", { class: "msg-images" }, pictures.map((src) => h("img", { src, alt: "Image the tool returned" }))) : null);
  }

  function renderMessage(msg) {
    const isAnswer = msg.role === "assistant";
    const calls = (msg.tool_calls ?? []).filter((c) => c.type === "mcp_call");
    const body = h("div", { class: "md", "data-testid": "message-body" });
    body.innerHTML = renderMarkdown(msg.content);
    const images = (msg.images ?? []).filter(localImage);
    return h("article", {
      class: `msg msg--${msg.role}`, "data-testid": "message",
      "data-id": msg.id, "data-role": msg.role, "data-status": msg.status,
    },
    avatar(msg.author, isAnswer),
    h("div", { class: "msg-main" },
      h("div", { class: "msg-head" },
        h("span", { class: "msg-author", "data-testid": "message-author" }, msg.author),
        h("time", { datetime: new Date(msg.created * 1000).toISOString(), title: new Date(msg.created * 1000).toLocaleString() }, timeLabel(msg.created)),
        statusBadge(msg.status)),
      calls.length ? h("div", { class: "tool-calls" }, calls.map(renderCall)) : null,
      body,
      images.length ? h("div", { class: "msg-images" }, images.map((src) =>
        h("a", { href: src, target: "_blank", rel: "noopener noreferrer" }, h("img", { src, alt: "Attached image", loading: "lazy" })))) : null,
      msg.error ? h("p", { class: "msg-error" }, msg.error) : null,
      isAnswer ? answerFooter(msg) : null));
  }

  function statusBadge(status) {
    const label = { streaming: "answering", stopped: "stopped", error: "failed" }[status];
    return label ? h("span", { class: `badge badge--${status}` }, label) : null;
  }

  function answerFooter(msg) {
    const parts = [];
    if (msg.asked_by) parts.push(`asked by ${msg.asked_by}`);
    if (msg.usage) {
      const { prompt_tokens: inTok, completion_tokens: outTok, cost } = msg.usage;
      parts.push(`${count(inTok + outTok)} tokens`, money(cost));
    } else if (msg.status === "streaming") parts.push("streaming…");
    const tools = (msg.tool_calls ?? []).filter((c) => c.type !== "mcp_call").map((t) => t.name);
    if (tools.length) parts.push(`used ${tools.join(", ")}`);
    const action = msg.status === "streaming"
      ? h("button", { type: "button", class: "btn btn-small", "data-testid": "stop", onclick: () => act(msg.id, "stop") }, "■ Stop")
      : h("button", { type: "button", class: "btn btn-small btn-ghost", "data-testid": "regenerate", onclick: () => act(msg.id, "regenerate") }, "↻ Regenerate");
    return h("div", { class: "msg-foot" },
      h("span", { class: "msg-meta", "data-testid": "message-meta", title: msg.usage ? `${count(msg.usage.prompt_tokens)} in · ${count(msg.usage.completion_tokens)} out` : null }, parts.join(" · ")),
      action);
  }

  async function act(mid, verb) {
    showAlert(actionError, "");
    try {
      upsertMessage(await api(`${base}/messages/${mid}/${verb}`, "POST", verb === "regenerate" ? ctx.authored() : undefined));
    } catch (err) {
      showAlert(actionError, err.message);
    }
  }

  // On a desktop the thread scrolls inside its column; on a phone the page scrolls (the panel sits below).
  const threadScroll = list.parentElement;
  const ownScroll = () => getComputedStyle(threadScroll).overflowY === "auto";
  const threadBottom = () => threadScroll.parentElement.getBoundingClientRect().bottom;
  function nearEnd() {
    if (!ownScroll()) return threadBottom() - window.innerHeight < 120;
    return threadScroll.scrollHeight - threadScroll.scrollTop - threadScroll.clientHeight < 120;
  }
  function scrollToEnd() {
    if (ownScroll()) threadScroll.scrollTop = threadScroll.scrollHeight;
    else window.scrollBy(0, threadBottom() - window.innerHeight);
  }

  // ---- memory (notes) ---------------------------------------------------------------------------

  function noteForm() {
    const input = h("textarea", { class: "note-input", rows: 2, placeholder: "Pin a note for this Space…", "data-testid": "note-input", "aria-label": "New note" });
    const error = alertBox();
    const add = h("button", { type: "submit", class: "btn btn-primary btn-small", "data-testid": "add-note" }, "Add note");
    return h("form", {
      class: "note-form",
      onsubmit: async (e) => {
        e.preventDefault();
        if (!input.value.trim()) return;
        add.disabled = true;
        try {
          upsertNote(await api(`${base}/notes`, "POST", ctx.authored({ text: input.value.trim() })));
          input.value = "";
          showAlert(error, "");
        } catch (err) {
          showAlert(error, err.message);
        } finally {
          add.disabled = false;
        }
      },
    }, input, error, add);
  }

  function upsertNote(note) {
    notes.set(note.id, note);
    if (!editing.has(note.id)) placeById(noteList, noteNodes, note.id, renderNote(note));
    noteEmpty.hidden = notes.size > 0;
  }

  function removeNote(nid) {
    notes.delete(nid);
    editing.delete(nid);
    noteNodes.get(nid)?.remove();
    noteNodes.delete(nid);
    noteEmpty.hidden = notes.size > 0;
  }

  function renderNote(note) {
    const proposed = note.status === "proposed";
    const error = alertBox();
    const run = async (work) => {
      try { await work(); } catch (err) { showAlert(error, err.message); }
    };
    const button = (testid, label, onclick, cls = "btn-ghost") =>
      h("button", { type: "button", class: `btn btn-small ${cls}`, "data-testid": testid, onclick: () => run(onclick) }, label);
    const li = h("li", { class: `note note--${note.status}`, "data-testid": "note", "data-id": note.id, "data-status": note.status });

    if (editing.has(note.id)) {
      const input = h("textarea", { class: "note-edit", rows: 3, value: note.text, "aria-label": "Edit note" });
      const finish = (fresh) => { editing.delete(note.id); upsertNote(fresh ?? notes.get(note.id)); };
      li.append(input, error, h("div", { class: "note-actions" },
        button("save-note", "Save", async () => finish(await api(`${base}/notes/${note.id}`, "PATCH", { text: input.value })), "btn-primary"),
        button("cancel-edit", "Cancel", async () => finish())));
      queueMicrotask(() => input.focus());
      return li;
    }
    if (proposed) li.append(h("p", { class: "note-label" }, `Proposed by ${note.author}`));
    li.append(
      h("p", { class: "note-text" }, note.text),
      error,
      h("div", { class: "note-actions" },
        proposed ? null : h("span", { class: "note-author" }, note.author),
        proposed ? button("confirm-note", "Confirm", async () => upsertNote(await api(`${base}/notes/${note.id}/confirm`, "POST")), "btn-primary") : null,
        button("edit-note", "Edit", async () => { editing.add(note.id); placeById(noteList, noteNodes, note.id, renderNote(notes.get(note.id))); }),
        button("delete-note", proposed ? "Dismiss" : "Delete", async () => { await api(`${base}/notes/${note.id}`, "DELETE"); removeNote(note.id); })));
    return li;
  }

  return () => {
    closed = true;
    clearTimeout(retryTimer);
    events?.close();
  };
}

/** Puts `node` where the item with this id belongs (lists are ordered by id), replacing an older node. */
function placeById(container, nodes, id, node) {
  const old = nodes.get(id);
  nodes.set(id, node);
  if (old) return old.replaceWith(node);
  const next = [...nodes.keys()].filter((k) => k > id).sort((a, b) => a - b)[0];
  container.insertBefore(node, next === undefined ? null : nodes.get(next));
}

function creditsCard() {
  const teamSpent = h("span", { "data-testid": "team-spent" });
  const teamBudget = h("span", { "data-testid": "team-budget" });
  const spaceSpent = h("span", { "data-testid": "space-spent" });
  const team = h("span", { class: "muted small" });
  const fill = h("div", { class: "meter-fill" });
  const meter = h("div", { class: "meter", role: "presentation" }, fill);
  const el = h("section", { class: "card credits", "data-testid": "credits" },
    h("div", { class: "card-head" }, h("h2", {}, "Credits"), team),
    h("p", { class: "muted small" }, "Team pool"),
    h("p", { class: "credits-pool" }, teamSpent, h("span", { class: "muted" }, " of "), teamBudget),
    meter,
    h("div", { class: "credits-row" }, h("span", { class: "muted" }, "This Space"), spaceSpent),
    h("p", { class: "muted small" }, "This calendar month, shared by the whole team."));

  function render(c) {
    team.textContent = c.team;
    teamSpent.textContent = money(c.team_spent);
    teamBudget.textContent = c.monthly_budget == null ? "no budget" : money(c.monthly_budget);
    spaceSpent.textContent = money(c.space_spent);
    meter.hidden = !c.monthly_budget;
    if (c.monthly_budget) {
      const used = Math.min(1, c.team_spent / c.monthly_budget);
      fill.style.width = `${(used * 100).toFixed(1)}%`;
      meter.classList.toggle("meter--high", used > 0.85);
    }
  }
  return { el, render };
}
