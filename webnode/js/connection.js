// The gateway connection: hello -> welcome, JSON control messages and binary steps, leaving with error + bye,
// and reconnecting with backoff when the socket drops (docs/wire-protocol.md, "Control messages").

export const PROTOCOL_VERSION = 1;
const WELCOME_TIMEOUT_MS = 10_000;
const CLOSE_REPLACED = 4000; // the gateway took a newer connection with our node id: that one serves now
// Browsers may only close with 1000 or 3000-4999, so the page's codes for a gateway's bad input are
// 4000 + the protocol code a native peer would use: 4007 (invalid payload, 1007), 4002 (protocol error, 1002).
export const CLOSE_INVALID_PAYLOAD = 4007;
export const CLOSE_PROTOCOL_ERROR = 4002;

/**
 * The gateway's WebSocket URL: ?gateway= when given, else /ws on the page's own host, wss under https.
 * @param {Location} location
 */
export function gatewayUrl(location) {
  const override = new URLSearchParams(location.search).get("gateway");
  if (override) return override;
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

export class GatewayConnection {
  /**
   * @param {string} url
   * @param {() => object} hello the hello message, asked for again on every reconnect
   * @param {{onStatus: (status: string, detail?: string) => void, onWelcome: (welcome: object) => void,
   *   onControl: (message: object) => void, onBinary: (data: ArrayBuffer) => void,
   *   onGatewayError: (message: string) => void}} handlers
   */
  constructor(url, hello, handlers, { minDelayMs = 500, maxDelayMs = 15_000 } = {}) {
    this.url = url;
    this.hello = hello;
    this.handlers = handlers;
    this.minDelayMs = minDelayMs;
    this.maxDelayMs = maxDelayMs;
    this.delayMs = minDelayMs;
    this.socket = null;
    this.welcomed = false;
    this.stopped = false;
    this.retryTimer = null;
    this.sessions = 0; // welcomes received: each is a new session with no request state
  }

  start() {
    this.stopped = false;
    this.open();
  }

  get connected() {
    return this.socket?.readyState === WebSocket.OPEN && this.welcomed;
  }

  open() {
    clearTimeout(this.retryTimer);
    this.welcomed = false;
    this.handlers.onStatus("connecting", this.url);
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch (error) {
      this.handlers.onGatewayError(`cannot open ${this.url}: ${error.message}`);
      this.stopped = true; // a malformed URL does not get better by retrying
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    const welcomeTimer = setTimeout(() => {
      if (this.welcomed) return;
      this.reject(`no welcome from ${this.url} within ${WELCOME_TIMEOUT_MS / 1000} s`, CLOSE_PROTOCOL_ERROR, socket);
    }, WELCOME_TIMEOUT_MS);
    socket.onopen = () => socket.send(JSON.stringify({ kind: "hello", protocol: PROTOCOL_VERSION, ...this.hello() }));
    socket.onmessage = (event) => {
      if (socket !== this.socket) return;
      if (typeof event.data === "string") this.onText(event.data, socket);
      else if (!this.welcomed) this.reject("the gateway sent binary data before welcome", CLOSE_PROTOCOL_ERROR, socket);
      else this.handlers.onBinary(event.data);
    };
    socket.onclose = (event) => {
      clearTimeout(welcomeTimer);
      if (socket !== this.socket) return;
      this.socket = null;
      this.welcomed = false;
      const why = `closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`;
      if (event.code === CLOSE_REPLACED) this.stopped = true;
      if (this.stopped) {
        this.handlers.onStatus("left", why);
        return;
      }
      const delay = this.delayMs * (0.8 + 0.4 * Math.random());
      this.delayMs = Math.min(2 * this.delayMs, this.maxDelayMs);
      this.handlers.onStatus("reconnecting", `${why}; retrying in ${(delay / 1000).toFixed(1)} s`);
      this.retryTimer = setTimeout(() => this.open(), delay);
    };
  }

  onText(text, socket) {
    let message;
    try {
      message = JSON.parse(text);
    } catch (error) {
      this.reject(`the gateway sent text that is not JSON: ${error.message}`, CLOSE_INVALID_PAYLOAD, socket);
      return;
    }
    if (message === null || typeof message !== "object" || typeof message.kind !== "string") {
      this.reject('the gateway sent a control message without a "kind"', CLOSE_INVALID_PAYLOAD, socket);
      return;
    }
    if (message.kind === "welcome") {
      this.welcomed = true;
      this.delayMs = this.minDelayMs;
      this.sessions++;
      this.handlers.onWelcome(message);
    } else if (message.kind === "error") {
      this.handlers.onGatewayError(`gateway: ${message.message ?? "error"}`);
    } else if (!this.welcomed) {
      this.reject(`the gateway sent ${message.kind} before its welcome`, CLOSE_PROTOCOL_ERROR, socket);
    } else {
      this.handlers.onControl(message);
    }
  }

  /** Send a JSON control message; false when the socket is not open. */
  send(message) {
    if (this.socket?.readyState !== WebSocket.OPEN) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  /** Send a binary message (a step reply); false when the socket is not open. */
  sendBinary(bytes) {
    if (this.socket?.readyState !== WebSocket.OPEN) return false;
    this.socket.send(bytes);
    return true;
  }

  /**
   * The gateway sent something this node cannot accept: report it (fatal for this connection), close
   * with `code` (CLOSE_INVALID_PAYLOAD or CLOSE_PROTOCOL_ERROR), then reconnect after the backoff.
   */
  reject(message, code = CLOSE_INVALID_PAYLOAD, socket = this.socket) {
    this.handlers.onGatewayError(message);
    if (socket?.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ kind: "error", message: message.slice(0, 4000), fatal: true }));
    }
    socket?.close(code, message.slice(0, 120));
  }

  /** Leave this connection cleanly (a fatal error, bye, close) and join again after the backoff. */
  rejoin(reason, message) {
    const socket = this.socket;
    if (socket?.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ kind: "error", message: message.slice(0, 4000), fatal: true }));
    socket.send(JSON.stringify({ kind: "bye", reason: reason.slice(0, 200) }));
    socket.close(1000, reason.slice(0, 120));
  }

  /** Leave on purpose: an error first when there is one (fatal), then bye, then close; no reconnecting. */
  leave(reason, fatalMessage = null) {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    const socket = this.socket;
    if (socket?.readyState === WebSocket.OPEN) {
      if (fatalMessage) {
        socket.send(JSON.stringify({ kind: "error", message: fatalMessage.slice(0, 4000), fatal: true }));
      }
      socket.send(JSON.stringify({ kind: "bye", reason: reason.slice(0, 200) }));
      socket.close(1000, reason.slice(0, 120));
    } else if (socket) {
      socket.close();
    }
    if (!socket) this.handlers.onStatus("left", reason);
  }
}
