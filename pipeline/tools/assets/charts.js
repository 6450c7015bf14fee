/* Small helpers over Chart.js (vendored beside this file: chart.umd.min.js, MIT) and number formatting, shared by
   the web pages and the self-contained compare report. */
(function () {
  "use strict";

  function fmt(x) {
    if (x === null || x === undefined) return "-";
    if (typeof x !== "number") return String(x);
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return Number(x.toPrecision(4)).toString();
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const charts = new WeakMap();

  function draw(canvas, config) {
    if (typeof Chart === "undefined") return null;  // the page still works, without charts
    const old = charts.get(canvas);
    if (old) old.destroy();
    config.options = Object.assign({animation: false, responsive: true, maintainAspectRatio: false}, config.options);
    const chart = new Chart(canvas, config);
    charts.set(canvas, chart);
    return chart;
  }

  /* Bars of counts over bins given by their edges (n+1 edges for n counts). */
  function histogram(canvas, edges, counts, opts) {
    opts = opts || {};
    const labels = counts.map((_, i) => opts.label ? opts.label(edges[i], edges[i + 1]) : fmt((edges[i] + edges[i + 1]) / 2));
    return draw(canvas, {
      type: "bar",
      data: {labels, datasets: [{label: opts.title || "count", data: counts, backgroundColor: opts.color || "#4c78a8",
                                 barPercentage: 1.0, categoryPercentage: 1.0}]},
      options: {plugins: {legend: {display: false}},
                scales: {x: {title: {display: !!opts.xTitle, text: opts.xTitle}, ticks: {maxRotation: 60}},
                         y: {type: opts.logY ? "logarithmic" : "linear", title: {display: true, text: "elements"}}}},
    });
  }

  /* Stacked bars: one bar per label, one dataset per series ({name: [values]}). */
  function stacked(canvas, labels, series, yTitle) {
    const palette = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac"];
    const datasets = Object.entries(series).map(([name, data], i) => ({label: name, data,
      backgroundColor: palette[i % palette.length]}));
    return draw(canvas, {type: "bar", data: {labels, datasets},
      options: {scales: {x: {stacked: true}, y: {stacked: true, title: {display: true, text: yTitle}}}}});
  }

  window.StagepipeCharts = {fmt, el, draw, histogram, stacked};
})();
