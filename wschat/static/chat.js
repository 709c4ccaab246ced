// The wschat browser client: speaks the wschat.v1 JSON subprotocol.
// Every message is rendered with textContent, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { ws: null, nick: "", room: "", wanted: false, retry: 0, timer: null, users: [] };

  function chatUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const room = state.room ? "/" + encodeURIComponent(state.room) : "";
    return `${scheme}://${location.host}/chat${room}?nick=${encodeURIComponent(state.nick)}`;
  }

  function setStatus(kind, text) {
    const status = $("status");
    status.className = "status " + kind;
    status.textContent = text;
    const online = kind === "online";
    $("message").disabled = !online;
    $("send").disabled = !online;
  }

  function timeText(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function addLine(parts, className) {
    const list = $("messages");
    const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    const li = document.createElement("li");
    if (className) li.className = className;
    for (const [cls, text] of parts) {
      const span = document.createElement("span");
      if (cls) span.className = cls;
      span.textContent = text;
      li.appendChild(span);
    }
    list.appendChild(li);
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function showMessage(msg, history) {
    addLine([["time", timeText(msg.time)], ["nick", msg.nick], ["text", msg.text]], history ? "message history" : "message");
  }

  function notice(text, cls) {
    addLine([["time", timeText(Date.now())], [null, text]], cls || "notice");
  }

  function showUsers() {
    const ul = $("users");
    ul.replaceChildren();
    for (const name of [...state.users].sort()) {
      const li = document.createElement("li");
      li.textContent = name;
      if (name === state.nick) li.className = "me";
      ul.appendChild(li);
    }
    $("count").textContent = `(${state.users.length})`;
  }

  const handlers = {
    welcome(msg) {
      state.nick = msg.nick;
      state.users = msg.users;
      localStorage.setItem("wschat.nick", msg.nick);
      $("room-label").textContent = `room ${msg.room} as ${msg.nick}`;
      $("messages").replaceChildren();
      for (const old of msg.history) showMessage(old, true);
      if (msg.text) notice(msg.text);
      showUsers();
    },
    message(msg) { showMessage(msg, false); },
    join(msg) { state.users.push(msg.nick); showUsers(); notice(`${msg.nick} joined`); },
    leave(msg) { state.users = state.users.filter((n) => n !== msg.nick); showUsers(); notice(`${msg.nick} left`); },
    nick(msg) {
      state.users = state.users.map((n) => (n === msg.old ? msg.nick : n));
      if (msg.old === state.nick) {
        state.nick = msg.nick;
        localStorage.setItem("wschat.nick", msg.nick);
        $("room-label").textContent = `room ${msg.room} as ${msg.nick}`;
      }
      showUsers();
      notice(`${msg.old} is now ${msg.nick}`);
    },
    users(msg) { state.users = msg.users; showUsers(); },
    error(msg) { notice(msg.text, "notice error"); },
  };

  function connect() {
    clearTimeout(state.timer);
    setStatus("connecting", state.retry ? `reconnecting (try ${state.retry})` : "connecting");
    const ws = new WebSocket(chatUrl(), "wschat.v1");
    state.ws = ws;
    ws.onopen = () => { state.retry = 0; setStatus("online", "online"); $("message").focus(); };
    ws.onmessage = (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { notice(String(event.data)); return; }
      const handler = handlers[msg.type];
      if (handler) handler(msg);
    };
    ws.onclose = (event) => {
      if (state.ws !== ws) return;
      state.ws = null;
      if (!state.wanted) { setStatus("offline", "offline"); return; }
      // Back off 1, 2, 4 ... 30 s, with jitter, until the server is back.
      const delay = Math.min(30000, 1000 * 2 ** state.retry) * (0.75 + Math.random() / 2);
      state.retry += 1;
      setStatus("offline", `offline (code ${event.code}); retrying in ${Math.round(delay / 1000)} s`);
      state.timer = setTimeout(connect, delay);
    };
  }

  function send(text) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
    const rename = /^\/nick\s+(.+)$/.exec(text);
    state.ws.send(JSON.stringify(rename ? { type: "nick", nick: rename[1].trim() } : { type: "message", text }));
  }

  $("join").addEventListener("submit", (event) => {
    event.preventDefault();
    state.nick = $("nick").value.trim();
    state.room = $("room").value.trim();
    state.wanted = true;
    state.retry = 0;
    $("join").hidden = true;
    $("chat").hidden = false;
    connect();
  });

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("message");
    if (input.value.trim()) send(input.value);
    input.value = "";
  });

  $("leave").addEventListener("click", () => {
    state.wanted = false;
    clearTimeout(state.timer);
    if (state.ws) state.ws.close(1000, "left");
    $("chat").hidden = true;
    $("join").hidden = false;
    setStatus("offline", "offline");
  });

  const params = new URLSearchParams(location.search);
  $("nick").value = params.get("nick") || localStorage.getItem("wschat.nick") || "";
  $("room").value = params.get("room") || "";
})();
