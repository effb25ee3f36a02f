// The Nexus console's only script (written for it; no library). It opens one
// Server-Sent Events stream for the page it is on and swaps in the live region the
// console server re-rendered (already escaped there) whenever the gateway reports a
// change. No polling: the browser's EventSource reconnects by itself when the console
// restarts, and the server pushes the gateway's own outages into the region.
'use strict';
(function () {
  var live = document.getElementById('live');
  var conn = document.getElementById('conn');
  if (!live || !window.EventSource) {
    if (conn) { conn.textContent = 'static page: live updates need EventSource'; }
    return;
  }
  var stats = { updates: 0, lastRenderMs: 0, lastUpdateAt: 0 };
  window.nexusConsole = stats;
  var page = location.pathname + location.search;
  var source = new EventSource('/events?page=' + encodeURIComponent(page));
  source.addEventListener('open', function () {
    conn.textContent = 'live';
    conn.className = 'ok';
  });
  source.addEventListener('error', function () {
    conn.textContent = 'lost the console server; reconnecting…';
    conn.className = 'bad';
  });
  source.addEventListener('update', function (event) {
    var started = performance.now();
    // Keep the reader's place: focus and scroll survive the swap.
    var focusedId = document.activeElement && document.activeElement.id;
    live.innerHTML = event.data;
    if (focusedId) {
      var again = document.getElementById(focusedId);
      if (again) { again.focus(); }
    }
    stats.updates += 1;
    stats.lastRenderMs = performance.now() - started;
    stats.lastUpdateAt = Date.now();
    conn.textContent = 'live';
    conn.className = 'ok';
  });
})();
