"use strict";
(() => {
  const form = document.getElementById("new-loop");
  const error = document.getElementById("new-loop-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    LB.show(error, "");
    const title = String(new FormData(form).get("title") || "").trim();
    try {
      const loop = await LB.json("POST", "/loops", title ? { title } : {});
      location.assign("/loops/" + encodeURIComponent(loop.id));
    } catch (e) {
      LB.show(error, e.message);
    }
  });
  for (const time of document.querySelectorAll("time[datetime]")) {
    const moment = new Date(time.getAttribute("datetime"));
    if (!Number.isNaN(moment.getTime())) time.textContent = moment.toLocaleString();
  }
})();
