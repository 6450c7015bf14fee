/* The chat page: POST a message (a turn starts: `stagepipe run` on the conversation's run folder), then follow the
   reply as server-sent events until it is done or stopped. */
(function () {
  "use strict";
  const {el} = window.StagepipeCharts;
  const page = JSON.parse(document.getElementById("page-data").textContent);
  const $ = (id) => document.getElementById(id);
  const box = $("messages"), input = $("message"), send = $("send"), stop = $("stop"), note = $("chat-note");
  let conversation = page.conversation, source = null;

  const onnxInput = document.querySelector("#settings [name=onnx_dir]");
  if (page.defaults.onnx_dir && !onnxInput.value) onnxInput.value = page.defaults.onnx_dir;

  function stats(m) {
    const parts = [];
    if (m.stop_reason) parts.push(`stop: ${m.stop_reason}`);
    if (m.tokens !== undefined) parts.push(`${m.tokens} tokens`);
    if (m.time_to_first_token_s) parts.push(`first token ${m.time_to_first_token_s.toFixed(3)} s`);
    if (m.decode_tokens_per_s) parts.push(`${m.decode_tokens_per_s.toFixed(1)} tok/s`);
    return parts.join(" · ");
  }

  function bubble(role, text, info) {
    const body = el("span", {class: "text"}, text || "");
    const node = el("div", {class: `msg ${role}`}, body, el("span", {class: "stats"}, info ? stats(info) : ""));
    box.append(node);
    box.scrollTop = box.scrollHeight;
    return node;
  }

  function busy(on) {
    send.disabled = on;
    stop.disabled = !on;
    input.disabled = on;
    if (!on) input.focus();
  }

  function settings() {
    const out = {};
    for (const inp of document.querySelectorAll("#settings input")) {
      if (inp.type === "checkbox") out[inp.name] = inp.checked;
      else if (inp.type === "number") out[inp.name] = Number(inp.value);
      else if (inp.value.trim()) out[inp.name] = inp.value.trim();
    }
    return out;
  }

  function follow(node) {
    const body = node.querySelector(".text"), info = node.querySelector(".stats");
    body.classList.add("streaming");
    busy(true);
    source = new EventSource(`/api/chat/events?c=${encodeURIComponent(conversation)}`);
    source.onmessage = (ev) => {
      const event = JSON.parse(ev.data);
      if (event.text !== undefined) {
        body.textContent = event.replace ? event.text : body.textContent + event.text;
        box.scrollTop = box.scrollHeight;
      }
      if (event.done) {
        source.close();
        body.classList.remove("streaming");
        node.classList.add("done");
        info.textContent = stats(event.done);
        if (event.done.error) node.append(el("div", {class: "error-box"}, event.done.error));
        busy(false);
      }
    };
    source.onerror = () => { if (source.readyState === EventSource.CLOSED) busy(false); };
  }

  async function submit(e) {
    e.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    busy(true);
    const r = await fetch("/api/chat/send", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({message: text, conversation, settings: settings()})});
    const body = await r.json().catch(() => ({error: `${r.status}`}));
    if (!r.ok) {
      note.replaceChildren(el("span", {class: "error-box", id: "chat-error"}, body.error));
      busy(false);
      return;
    }
    conversation = body.conversation;
    history.replaceState(null, "", `/chat?c=${encodeURIComponent(conversation)}`);
    title();
    input.value = "";
    note.textContent = "";
    bubble("user", text);
    follow(bubble("assistant", ""));
  }

  function title() {
    $("chat-title").replaceChildren(conversation, " ", el("a", {href: `/run?run=${encodeURIComponent(conversation)}`,
      class: "muted", style: "font-size:.6em", id: "run-link"}, "its run folder: every step →"));
  }

  async function load() {
    if (!conversation) { busy(false); return; }
    title();
    const r = await fetch(`/api/chat?c=${encodeURIComponent(conversation)}`);
    const data = await r.json();
    if (!r.ok) { note.replaceChildren(el("span", {class: "error-box"}, data.error)); return; }
    const nodes = data.messages.map((m) => bubble(m.role, m.text, m.role === "assistant" ? m : null));
    if (!data.running) { busy(false); return; }
    // the reply being generated: its stream starts from its first token again
    const last = data.messages.length && data.messages[data.messages.length - 1].role === "assistant" ?
      nodes[nodes.length - 1] : bubble("assistant", "");
    last.querySelector(".text").textContent = "";
    last.querySelector(".stats").textContent = "";
    follow(last);
  }

  $("composer").addEventListener("submit", submit);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  stop.addEventListener("click", () => fetch(`/api/chat/stop?c=${encodeURIComponent(conversation)}`, {method: "POST"}));
  $("new-chat").addEventListener("click", () => { window.location.href = "/chat"; });
  load();
})();
