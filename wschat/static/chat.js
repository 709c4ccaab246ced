// The wschat browser client: speaks the wschat.v1 JSON subprotocol.
// Every message is rendered with textContent, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  // The same rule as wschat/names.py: NFKC, then letters, digits, '.', '_', '-'.
  const ROOM = /^[\p{L}\p{N}_.\-]{1,64}$/u;
  const NICK = /^[\p{L}\p{N}_][\p{L}\p{N}_.\-]*$/u;
  const REFUSALS = { 1003: "the server refused binary data", 1008: "the server refused this chat" };
  const config = { path: "/chat", subprotocol: "wschat.v1", maxLength: 2000, maxNickLength: 24 };
  const state = {
    ws: null, chosen: "", nick: "", room: "", wanted: false,
    retry: 0, timer: null, countdown: null, refusedOpens: 0,
    epoch: null, lastSeq: 0, users: [], renameTries: 0, renameTimer: null,
    unconfirmed: [],  // {id, text} sent and not yet seen back: sent again after a reconnect if the server never took them
  };

  // -- what the server says about itself -------------------------------------------------

  async function loadConfig() {
    try {
      const response = await fetch("wschat.json", { cache: "no-store" });
      if (response.ok) Object.assign(config, await response.json());
    } catch (error) { /* an older server, or none: the defaults stand */ }
    setLimit($("message"), config.maxLength);
    setLimit($("nick"), config.maxNickLength);
    if (config.user) {  // logged in to the app that serves the page: that is the nickname
      $("nick").value = config.user;
      $("nick").readOnly = true;
      $("nick-hint").textContent = "(your login)";
    }
  }

  function setLimit(input, limit) {
    if (limit) input.maxLength = limit; else input.removeAttribute("maxlength");
  }

  function chatUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // A room is a step below the chat's path (below "/" too, served with --path /).
    const path = state.room ? `${config.path.replace(/\/$/, "")}/${encodeURIComponent(state.room)}` : config.path;
    // Coming back: the server sends exactly what was missed since the last message seen.
    const since = state.epoch === null ? "" : `&since=${state.lastSeq}&epoch=${encodeURIComponent(state.epoch)}`;
    return `${scheme}://${location.host}${path}?nick=${encodeURIComponent(state.chosen)}${since}`;
  }

  // -- what the page shows -----------------------------------------------------------------

  function setStatus(kind, text) {
    const status = $("status");
    status.className = "status " + kind;
    status.textContent = text;
    const online = kind === "online";
    $("message").disabled = !online;
    $("send").disabled = !online;
    // Away from the chat the list is what it was when we left it: say so.
    $("users-pane").classList.toggle("stale", !online);
    $("users-word").textContent = online ? "Online" : "Last seen online";
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
    state.lastSeq = Math.max(state.lastSeq, msg.seq || 0);
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
    $("people-count").textContent = `(${state.users.length})`;
  }

  // -- what the server sends -------------------------------------------------------------------

  const handlers = {
    welcome(msg) {
      // The epoch names the room's sequence of messages: the same epoch after
      // a reconnect means the history continues what the page shows already.
      const first = state.epoch === null;
      const restarted = !first && state.epoch !== msg.epoch;
      if (first) $("messages").replaceChildren();
      if (restarted) {
        notice("The server restarted: earlier messages are not kept there.");
        state.lastSeq = 0;
      }
      const fresh = msg.history.filter((m) => m.seq > state.lastSeq);
      msg.history.forEach(confirm);
      if (!first && !restarted && msg.missed) notice("Some messages were missed while offline.");
      state.epoch = msg.epoch;
      for (const old of fresh) showMessage(old, true);
      if (msg.text && first) notice(msg.text);
      state.nick = msg.nick;
      if (msg.identified) state.chosen = msg.nick;  // the app's user name: nothing to reclaim
      state.users = msg.users;
      state.retry = 0;  // a welcome, not a mere open, is a success
      state.refusedOpens = 0;
      $("room-label").textContent = `room ${msg.room} as ${msg.nick}`;
      showUsers();
      setStatus("online", "online");
      $("message").focus();
      // What we sent that is in no history was never taken (a server that
      // stops publishes all it took before it closes): send it again.
      for (const mine of state.unconfirmed) sendJson({ type: "message", text: mine.text, id: mine.id });
    },
    message(msg) {
      confirm(msg);
      if (!(msg.seq <= state.lastSeq)) showMessage(msg, false);
    },
    join(msg) {
      if (!state.users.includes(msg.nick)) state.users.push(msg.nick);
      showUsers();
      notice(`${msg.nick} joined`);
    },
    epoch(msg) {  // the server lost its history (a Redis restarted empty): numbering starts over
      state.epoch = msg.epoch;
      state.lastSeq = 0;
      notice("The chat's history was lost on the server; new messages follow.");
    },
    leave(msg) { state.users = state.users.filter((n) => n !== msg.nick); showUsers(); notice(`${msg.nick} left`); },
    nick(msg) {
      state.users = state.users.map((n) => (n === msg.old ? msg.nick : n));
      if (msg.old === state.nick) {
        state.nick = msg.nick;
        state.renameTries = 0;
        $("room-label").textContent = `room ${msg.room} as ${msg.nick}`;
      }
      showUsers();
      notice(`${msg.old} is now ${msg.nick}`);
    },
    users(msg) { state.users = msg.users; showUsers(); },
    error(msg) {
      if (msg.id) confirm(msg);  // not sent, and we say so: not to be sent again
      if (msg.code === "nick_refused" && /taken/.test(msg.text) && state.nick !== state.chosen) {
        if (state.renameTries === 0) notice(`${msg.text}; asking again in a few seconds`, "notice error");
        reclaimNick();  // maybe held by our own previous connection: the server drops it soon
        return;
      }
      notice(msg.text, "notice error");
    },
  };

  function confirm(msg) {
    if (msg.id) state.unconfirmed = state.unconfirmed.filter((mine) => mine.id !== msg.id);
  }

  // The nickname the user chose is taken, maybe by our own previous
  // connection, which the server drops within its ping timeout: ask again,
  // every 5 s, six times at most.
  function reclaimNick() {
    clearTimeout(state.renameTimer);
    if (state.renameTries >= 6) { state.renameTries = 0; return; }
    state.renameTries += 1;
    state.renameTimer = setTimeout(() => {
      if (state.nick !== state.chosen) sendJson({ type: "nick", nick: state.chosen });
    }, 5000);
  }

  // -- the connection ----------------------------------------------------------------------------

  function connect() {
    clearTimeout(state.timer);
    clearInterval(state.countdown);
    setStatus("connecting", state.retry ? `reconnecting (try ${state.retry + 1})` : "connecting");
    const ws = new WebSocket(chatUrl(), config.subprotocol);
    let opened = false;
    state.ws = ws;
    ws.onopen = () => { opened = true; setStatus("connecting", "joining"); };  // online once welcomed
    ws.onmessage = (event) => {
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { notice(String(event.data)); return; }
      const handler = handlers[msg.type];
      if (handler) handler(msg);
    };
    ws.onclose = async (event) => {
      if (state.ws !== ws) return;
      state.ws = null;
      if (!state.wanted) { setStatus("offline", "offline"); return; }
      if (REFUSALS[event.code]) {
        giveUp(`${REFUSALS[event.code]}${event.reason ? ": " + event.reason : ""} (code ${event.code}).`);
        return;
      }
      if (!opened && await serverAnswers()) {
        // The server is up but refused the upgrade (origin not allowed, too many connections...).
        state.refusedOpens += 1;
        if (state.refusedOpens >= 3) {
          giveUp("The server is up but refuses this chat connection (an origin it does not allow, or too many connections).");
          return;
        }
      }
      scheduleReconnect(event.code);
    };
  }

  async function serverAnswers() {
    try { return (await fetch("wschat.json", { cache: "no-store" })).ok; } catch (error) { return false; }
  }

  function scheduleReconnect(code) {
    // Capped exponential backoff, 1 s to 30 s, with jitter; reset only by a welcome.
    const delay = Math.min(30000, 1000 * 2 ** state.retry) * (0.75 + Math.random() / 2);
    state.retry += 1;
    const until = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
      setStatus("offline", `offline (code ${code}); retrying in ${left} s`);
    };
    tick();
    state.countdown = setInterval(tick, 250);
    state.timer = setTimeout(connect, delay);
  }

  function giveUp(text) {
    state.wanted = false;
    clearInterval(state.countdown);
    setStatus("offline", "disconnected");
    notice(text, "notice error");
  }

  function sendJson(request) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(request));
  }

  function send(text) {
    const rename = /^\/nick\s+(.+)$/.exec(text);
    if (rename) {
      state.chosen = rename[1].trim().normalize("NFKC");
      localStorage.setItem("wschat.nick", state.chosen);
      sendJson({ type: "nick", nick: state.chosen });
    } else {
      const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
      state.unconfirmed.push({ id, text });
      sendJson({ type: "message", text, id });
    }
  }

  // -- the forms ---------------------------------------------------------------------------------

  $("join").addEventListener("submit", (event) => {
    event.preventDefault();
    const nick = $("nick").value.trim().normalize("NFKC");
    const room = $("room").value.trim().normalize("NFKC");
    const problem = !NICK.test(nick) ? "A nickname is letters, digits, '.', '_' or '-', starting with a letter or digit."
      : config.maxNickLength && nick.length > config.maxNickLength ? `A nickname has at most ${config.maxNickLength} characters.`
      : room && !ROOM.test(room) ? "A room name is 1 to 64 letters, digits, '.', '_' or '-'." : "";
    $("join-error").textContent = problem;
    if (problem) { (NICK.test(nick) ? $("room") : $("nick")).focus(); return; }
    Object.assign(state, { chosen: nick, nick, room, wanted: true, retry: 0, refusedOpens: 0,
                           epoch: null, lastSeq: 0, renameTries: 0, unconfirmed: [] });
    localStorage.setItem("wschat.nick", nick);
    $("join").hidden = true;
    $("chat").hidden = false;
    $("people").hidden = false;
    configReady.then(connect);
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
    clearTimeout(state.renameTimer);
    clearInterval(state.countdown);
    if (state.ws) state.ws.close(1000, "left");
    $("chat").hidden = true;
    $("people").hidden = true;
    $("join").hidden = false;
    setStatus("offline", "offline");
    $("nick").focus();
  });

  $("people").addEventListener("click", () => {
    const open = document.body.classList.toggle("show-people");
    $("people").setAttribute("aria-expanded", String(open));
  });

  const params = new URLSearchParams(location.search);
  $("nick").value = params.get("nick") || localStorage.getItem("wschat.nick") || "";
  $("room").value = params.get("room") || "";
  const configReady = loadConfig();
})();
