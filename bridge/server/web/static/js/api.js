"use strict";
// Calls from the pages to the Loop API: same origin, JSON bodies (also on POSTs that
// need none, so every state-changing request is a JSON one), errors as the API says them.
const LB = (() => {
  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `the server answered ${status}`);
      this.status = status;
      this.code = error.code || "";
    }
  }

  async function json(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body === undefined ? {} : body);
    }
    const response = await fetch("/api/v1" + path, init);
    if (!response.ok) {
      throw new ApiError(response.status, await response.json().catch(() => null));
    }
    return response.status === 200 || response.status === 201 ? response.json() : null;
  }

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function show(element, message) {
    element.textContent = message || "";
    element.hidden = !message;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  const logout = document.getElementById("logout");
  if (logout) {
    logout.addEventListener("click", async () => {
      try {
        await json("POST", "/logout");
      } finally {
        location.assign("/login");
      }
    });
  }

  return { ApiError, json, randomKey, show, el };
})();
