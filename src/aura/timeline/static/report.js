/* Aura's run report: one uPlot chart per group of series on a shared x (seconds since
   the run's start), the fault windows shaded and labelled on each, then a summary of
   what was drawn written into <pre id="aura-report-check"> (the tests read it). */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("aura-report-data").textContent);
  var check = { charts: 0, canvases: 0, inked: 0, points: {}, windows: [], errors: [] };
  var colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  var xMax = Math.max(data.duration_s || 0, 1);
  data.groups.forEach(function (g) {
    g.x.forEach(function (x) { if (x > xMax) { xMax = x; } });
  });
  var dpr = window.devicePixelRatio || 1;
  var width = Math.max(480, Math.min(1100, document.documentElement.clientWidth - 48));

  function yRange(u, min, max) {
    if (min == null || max == null || !isFinite(min) || !isFinite(max)) { return [0, 1]; }
    var lo = Math.min(0, min);
    var hi = max > 0 ? max * 1.08 : max;
    if (!isFinite(hi)) { hi = max; }
    if (hi <= lo) { hi = lo + 1; }
    return [lo, hi];
  }

  function shortLabel(w, i) {
    var text = "[" + (i + 1) + "] " + w.label;
    return text.length > 48 ? text.slice(0, 47) + "\u2026" : text;
  }

  function drawWindows(u) {
    var ctx = u.ctx, b = u.bbox;
    ctx.save();
    ctx.beginPath();
    ctx.rect(b.left, b.top, b.width, b.height);
    ctx.clip();
    ctx.font = Math.round(11 * dpr) + "px sans-serif";
    ctx.textAlign = "left";  // uPlot leaves its axes' alignment on the context
    ctx.textBaseline = "alphabetic";
    data.windows.forEach(function (w, i) {
      var x0 = u.valToPos(w.start_s, "x", true);
      var x1 = u.valToPos(w.end_s, "x", true);
      var fault = w.kind === "fault";
      if (w.end_s > w.start_s) {
        ctx.fillStyle = fault ? "rgba(214, 39, 40, 0.13)" : "rgba(255, 127, 14, 0.16)";
        ctx.fillRect(x0, b.top, Math.max(x1 - x0, dpr), b.height);
      }
      ctx.strokeStyle = fault ? "rgba(214, 39, 40, 0.8)" : "rgba(255, 127, 14, 0.9)";
      ctx.lineWidth = dpr;
      ctx.setLineDash(fault ? [] : [4 * dpr, 3 * dpr]);
      ctx.beginPath();
      ctx.moveTo(x0, b.top);
      ctx.lineTo(x0, b.top + b.height);
      ctx.stroke();
      ctx.fillStyle = fault ? "#a01010" : "#9a4d00";
      ctx.fillText(shortLabel(w, i), x0 + 3 * dpr, b.top + (12 + 13 * (i % 4)) * dpr);
    });
    ctx.restore();
  }

  function windowsDrawn(u, chart) {
    data.windows.forEach(function (w, i) {
      var left = u.valToPos(w.start_s, "x");
      var right = u.valToPos(w.end_s, "x");
      check.windows.push({
        chart: chart, index: i, label: w.label, kind: w.kind,
        start_s: u.posToVal(left, "x"), end_s: u.posToVal(right, "x"),
        left_px: left, width_px: right - left
      });
    });
  }

  function chart(g, root) {
    var names = Object.keys(g.series);
    var series = [{ label: "s" }];
    var columns = [g.x];
    names.forEach(function (name, i) {
      var s = { label: name, stroke: colors[i % colors.length], width: 1.5, spanGaps: false };
      if (g.step) { s.paths = uPlot.paths.stepped({ align: 1 }); }
      series.push(s);
      columns.push(g.series[name]);
      check.points[g.name + "/" + name] = g.series[name].filter(function (v) {
        return v !== null;
      }).length;
    });
    var box = document.createElement("section");
    box.className = "chart";
    root.appendChild(box);
    var u = new uPlot({
      title: g.title + (g.unit ? " (" + g.unit + ")" : ""),
      width: width,
      height: 200,
      scales: { x: { time: false, range: [0, xMax] }, y: { range: yRange } },
      axes: [{ label: "seconds since the run's start" }, { size: 60 }],
      series: series,
      hooks: { draw: [drawWindows] }
    }, columns, box);
    check.charts += 1;
    return u;
  }

  function inked(canvas) {
    var ctx = canvas.getContext("2d");
    if (!ctx || !canvas.width || !canvas.height) { return false; }
    var pixels = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    for (var i = 3; i < pixels.length; i += 4) {
      if (pixels[i] !== 0) { return true; }
    }
    return false;
  }

  function finish() {
    if (plots.length) { windowsDrawn(plots[0], data.groups[0].name); }
    var canvases = document.querySelectorAll("#charts canvas");
    check.canvases = canvases.length;
    canvases.forEach(function (c) { if (inked(c)) { check.inked += 1; } });
    document.getElementById("aura-report-check").textContent = JSON.stringify(check);
  }

  var root = document.getElementById("charts");
  var plots = [];
  data.groups.forEach(function (g) {
    try { plots.push(chart(g, root)); } catch (e) { check.errors.push(g.name + ": " + e); }
  });
  // uPlot draws on a later turn of the event loop: the check waits for it.
  setTimeout(finish, 50);
})();
