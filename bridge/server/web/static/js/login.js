"use strict";
(() => {
  const form = document.getElementById("login");
  const error = document.getElementById("login-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    LB.show(error, "");
    const data = new FormData(form);
    try {
      await LB.json("POST", "/login", {
        username: String(data.get("username") || ""),
        password: String(data.get("password") || ""),
      });
      location.assign(form.dataset.next || "/loops");
    } catch (e) {
      LB.show(error, e.code === "invalid_credentials" ? "Wrong user name or password." : e.message);
    }
  });
})();
