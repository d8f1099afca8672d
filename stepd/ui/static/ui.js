// stepd's operator page: auto-refresh of the page's content every few seconds (data-refresh on
// <body>), which the Pause button stops, and which pauses by itself while a form is being edited
// (a field has the focus, or a form holds changes not yet sent). Plain script, no library; it only
// asks this page's own URL again, and swaps <main id="live"> for the fresh one.
(function () {
  "use strict";

  var seconds = Number(document.body.dataset.refresh || 0);
  var box = document.getElementById("refresh");
  if (!seconds || !box) {
    return;
  }
  var toggle = document.getElementById("refresh-toggle");
  var status = document.getElementById("refresh-status");
  var pausedByUser = false;
  var changed = new Set(); // forms whose fields were edited since the page (or its refresh) came
  var refreshed = 0;
  var busy = false;
  box.hidden = false;

  function editing() {
    var active = document.activeElement;
    var typing = active && active.form && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName) && active.type !== "hidden";
    return Boolean(typing) || changed.size > 0;
  }

  function clock() {
    return new Date().toISOString().slice(11, 19) + " UTC";
  }

  function say() {
    var paused = pausedByUser || editing();
    document.body.dataset.refreshState = pausedByUser ? "paused" : paused ? "editing" : "on";
    toggle.textContent = paused ? "Resume auto-refresh" : "Pause auto-refresh";
    toggle.setAttribute("aria-pressed", String(paused));
    if (pausedByUser) {
      status.textContent = "Auto-refresh paused";
    } else if (paused) {
      status.textContent = "Auto-refresh paused while you edit a form";
    } else {
      status.textContent = "Auto-refresh every " + seconds + " s" + (refreshed ? ", last at " + clock() : "");
    }
  }

  document.addEventListener("focusin", say);
  document.addEventListener("focusout", function () {
    window.setTimeout(say, 0); // once the focus has moved on
  });
  document.addEventListener("input", function (event) {
    if (event.target.form) {
      changed.add(event.target.form);
      say();
    }
  });
  document.addEventListener("change", function (event) {
    if (event.target.form) {
      changed.add(event.target.form);
      say();
    }
  });
  toggle.addEventListener("click", function () {
    if (pausedByUser || editing()) {
      // Resume: what was typed into a form and not sent gives way to the fresh page.
      pausedByUser = false;
      changed.clear();
      refresh();
    } else {
      pausedByUser = true;
    }
    say();
  });

  function refresh() {
    if (busy || pausedByUser || editing() || document.hidden) {
      return;
    }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        if (pausedByUser || editing()) {
          return; // the user started editing while the page was on its way: keep what they typed
        }
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (fresh && live) {
          live.replaceWith(document.adoptNode(fresh));
          changed.clear();
          refreshed += 1;
          document.body.dataset.refreshed = String(refreshed);
        }
        say();
      })
      .catch(function (error) {
        status.textContent = "Auto-refresh failed (" + error.message + "); it tries again";
      })
      .finally(function () {
        busy = false;
      });
  }

  say();
  window.setInterval(refresh, seconds * 1000);
})();
