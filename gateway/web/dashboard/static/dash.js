// faxgw dashboard: keep the parts of a page marked data-live up to date while it is open.
// The server renders (and escapes) every fragment; this only swaps them in.
(function () {
  "use strict";
  var PERIOD_MS = 5000;
  function refresh(el) {
    var url = el.getAttribute("data-live");
    return fetch(url, {credentials: "same-origin", headers: {"X-Requested-With": "fetch"},
                       cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/login"); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html === null) { return; }
        // Compare as the browser would serialise it: an unchanged part is left alone, so
        // the keyboard focus and the reading position stay where they are.
        var fresh = document.createElement("template");
        fresh.innerHTML = html;
        if (fresh.innerHTML !== el.innerHTML) {
          el.innerHTML = fresh.innerHTML;
        }
      })
      .catch(function () { /* offline for a moment: try again next time */ });
  }
  function tick() {
    if (!document.hidden) {
      document.querySelectorAll("[data-live]").forEach(refresh);
    }
  }
  document.addEventListener("DOMContentLoaded", function () {
    if (document.querySelector("[data-live]")) {
      window.setInterval(tick, PERIOD_MS);
    }
  });
})();
