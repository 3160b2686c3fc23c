// faxgw dashboard: keep the parts of a page marked data-live up to date while it is open.
// The server renders (and escapes) every fragment; this only swaps them in.
(function () {
  "use strict";
  var PERIOD_MS = 5000;
  function two(n) { return (n < 10 ? "0" : "") + n; }
  // Times come as <time datetime="...Z" title="... UTC">... UTC</time>: shown in the
  // viewer's own time zone, the UTC time on hover.
  function localize(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (isNaN(d.getTime())) { return; }
      t.textContent = d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) +
        " " + two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
    });
  }
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
        localize(fresh.content);
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
  // A picture that cannot come (the document is gone) is replaced by its words, not shown
  // as a broken image; inline handlers are not allowed by the page's CSP.
  function missing(img) {
    var p = document.createElement("p");
    p.className = "muted";
    p.id = "no-picture";
    p.textContent = img.getAttribute("data-missing");
    var figure = img.closest("figure") || img;
    figure.replaceWith(p);
  }
  document.addEventListener("DOMContentLoaded", function () {
    localize(document);
    document.querySelectorAll("img[data-missing]").forEach(function (img) {
      if (img.complete && img.naturalWidth === 0) { missing(img); return; }
      img.addEventListener("error", function () { missing(img); });
    });
    if (document.querySelector("[data-live]")) {
      window.setInterval(tick, PERIOD_MS);
    }
  });
})();
