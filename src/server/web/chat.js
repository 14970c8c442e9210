"use strict";
(() => {
  const log = document.getElementById("log");
  const statusLine = document.getElementById("status");
  const form = document.getElementById("send");
  const input = document.getElementById("text");
  const button = document.getElementById("button");
  const note = document.getElementById("note");
  const MAX_ITEMS = 1000;
  // The server counts a message's limit in bytes of UTF-8, not in characters.
  const MAX_BYTES = Number(form.dataset.maxBytes) || 65536;
  const encoder = new TextEncoder();
  // "127.0.0.1:53412: text" or "[::1]:53412: text": the server's tag, then the text.
  const TAGGED = /^((?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.%\w-]+\]):\d{1,5}): ([\s\S]*)$/;
  let socket = null;
  // Our address as the server tags it, learned from our own messages coming back, and
  // what we sent that has not come back yet, oldest first.
  let myAddr = null;
  let sent = [];
  let backoff = 1;
  let countdown = null;

  function setStatus(state, text) {
    statusLine.dataset.state = state;
    statusLine.textContent = text;
    button.disabled = state !== "connected";
  }

  function append(from, text) {
    const stick = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    const item = document.createElement("li");
    if (from === null) {
      item.className = "system";
      item.textContent = text;
    } else {
      item.dataset.from = from;
      if (from === myAddr) item.classList.add("mine");
      const label = document.createElement("span");
      label.className = "from";
      label.textContent = from;
      const body = document.createElement("span");
      body.className = "text";
      body.textContent = text;
      item.append(label, body);
    }
    log.append(item);
    while (log.children.length > MAX_ITEMS) log.firstElementChild.remove();
    if (stick) log.scrollTop = log.scrollHeight;
  }

  // The page learns its own address from its messages coming back: they come back in the
  // order they were sent, and nothing else comes from that address. Another client's
  // identical text can arrive first and be taken for ours; our next message to come back,
  // or the next thing the other address says, corrects that.
  let confirmedBy = 0;

  function learnAddress(from, text) {
    const at = sent.indexOf(text);
    if (from === myAddr) {
      if (at >= 0) {
        sent.splice(0, at + 1);
        confirmedBy += 1;
      } else {
        setAddress(null);
      }
      return;
    }
    // Another address said one of our texts: it is ours if we know none yet, or if the
    // one we took has shown no more than one of our texts.
    if (at >= 0 && (myAddr === null || confirmedBy < 2)) {
      sent.splice(0, at + 1);
      setAddress(from);
      confirmedBy = 1;
    }
  }

  function setAddress(addr) {
    myAddr = addr;
    confirmedBy = 0;
    for (const item of log.querySelectorAll("li[data-from]")) {
      item.classList.toggle("mine", item.dataset.from === myAddr);
    }
  }

  function receive(data) {
    if (typeof data !== "string") return;
    const match = TAGGED.exec(data);
    if (match === null) {
      append(null, data);
      return;
    }
    learnAddress(match[1], match[2]);
    append(match[1], match[2]);
  }

  function connect() {
    clearInterval(countdown);
    setStatus("connecting", "connecting…");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(scheme + "//" + location.host + "/");
    socket = ws;
    myAddr = null;
    confirmedBy = 0;
    sent = [];
    let opened = false;
    ws.onopen = () => {
      opened = true;
      backoff = 1;
      setStatus("connected", "connected");
    };
    ws.onmessage = (event) => receive(event.data);
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      if (!opened) {
        // A refused handshake shows the page nothing; the server says on /healthz why.
        explainRefusal();
        return;
      }
      const why = event.code === 1006
        ? "connection lost"
        : "closed by the server (" + event.code + (event.reason ? ": " + event.reason : "") + ")";
      append(null, why);
      reconnectLater(why);
    };
  }

  function explainRefusal() {
    fetch("/healthz", { cache: "no-store" })
      .then((response) => response.ok ? "cannot connect" : response.text())
      .catch(() => "cannot reach the server")
      .then((why) => reconnectLater(why.trim().replace(/^503 Service Unavailable: /, "")));
  }

  function reconnectLater(why) {
    let left = backoff;
    backoff = Math.min(backoff * 2, 30);
    const show = () => setStatus("disconnected", "disconnected (" + why + "): reconnecting in " + left + " s");
    show();
    countdown = setInterval(() => {
      left -= 1;
      if (left <= 0) connect(); else show();
    }, 1000);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (text.trim() === "" || socket === null || socket.readyState !== WebSocket.OPEN) return;
    const bytes = encoder.encode(text).length;
    if (bytes > MAX_BYTES) {
      note.textContent = "Too long to send: " + bytes + " bytes; the server takes at most " +
        MAX_BYTES + " (bytes of UTF-8: many characters take two to four).";
      note.hidden = false;
      return;
    }
    note.hidden = true;
    socket.send(text);
    sent.push(text);
    input.value = "";
    input.focus();
  });

  connect();
})();
