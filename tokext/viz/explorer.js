/* The tokext attention explorer's page logic (inlined by tokext.viz.explorer.render_page).
 *
 * Reads the JSON in #tokext-data, colours the layer x head grid (.cell[data-layer][data-head]) by the
 * chosen score, and draws the clicked head's pattern with Plotly: one heatmap per run (baseline,
 * edited, edited - baseline), tokens as tick labels, weights on hover, sink columns outlined.
 * Patterns arrive as the lower triangle of each head, row by row, as integers (weight x 10^decimals).
 * Nothing is fetched: the page works offline from file://.
 */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("tokext-data").textContent);
  var SCALE = Math.pow(10, DATA.decimals);
  var VIEWS = DATA.runs.length > 1 ? DATA.runs.concat(["difference"]) : DATA.runs.slice();
  var state = {prompt: 0, metric: DATA.metrics[0].key, run: VIEWS[0], layer: null, head: null};
  var cells = Array.prototype.slice.call(document.querySelectorAll("#grid .cell"));
  var VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  var DIVERGING = [[33, 102, 172], [247, 247, 247], [178, 24, 43]];
  var SINK_COLOUR = "#ff7f0e";

  function clamp(t, lo, hi) { return Math.min(hi, Math.max(lo, t)); }

  function mix(stops, t) {
    var x = clamp(t, 0, 1) * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    var c = stops[i].map(function (v, k) { return Math.round(v + f * (stops[i + 1][k] - v)); });
    return "rgb(" + c.join(",") + ")";
  }

  function esc(text) {  // Plotly reads tick and hover text as a little HTML
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function fmt(v) { return v === null ? "n/a" : v.toFixed(DATA.decimals); }

  function scale(stops) {  // a Plotly colorscale with the grid's colours
    return stops.map(function (c, i) { return [i / (stops.length - 1), "rgb(" + c.join(",") + ")"]; });
  }

  function range(n) { var r = []; for (var i = 0; i < n; i++) r.push(i); return r; }

  function metric() {
    return DATA.metrics.filter(function (m) { return m.key === state.metric; })[0];
  }

  function metricLabel() { return metric().label; }

  function score(run, layer, head) {
    var runs = DATA.prompts[state.prompt].runs;
    if (run === "difference") {
      var a = score("edited", layer, head), b = score("baseline", layer, head);
      return a === null || b === null ? null : a - b;
    }
    return runs[run].scores[state.metric][layer][head];
  }

  function pattern(run, layer, head) {
    var prompt = DATA.prompts[state.prompt], n = prompt.tokens.length, z = [], i, j;
    if (run === "difference") {
      var e = pattern("edited", layer, head), b = pattern("baseline", layer, head);
      return e.map(function (row, i) {
        return row.map(function (v, j) { return v === null ? null : Math.round((v - b[i][j]) * SCALE) / SCALE; });
      });
    }
    var flat = prompt.runs[run].patterns[layer][head];
    for (i = 0; i < n; i++) {
      var row = new Array(n).fill(null), start = i * (i + 1) / 2;
      for (j = 0; j <= i; j++) row[j] = flat[start + j] / SCALE;
      z.push(row);
    }
    return z;
  }

  function drawGrid() {
    var diff = state.run === "difference";
    var values = cells.map(function (c) { return score(state.run, +c.dataset.layer, +c.dataset.head); });
    var hi = 1, lo = 0;
    if (metric().unbounded) {  // a norm: coloured from 0 to the grid's largest value
      hi = Math.max.apply(null, values.map(function (v) { return v === null ? 0 : Math.abs(v); }).concat([1 / SCALE]));
    }
    if (diff) {
      hi = Math.max.apply(null, values.map(function (v) { return v === null ? 0 : Math.abs(v); }).concat([1 / SCALE]));
      lo = -hi;
    }
    cells.forEach(function (c, k) {
      var v = values[k];
      c.style.background = v === null ? "#cccccc" : diff ? mix(DIVERGING, (v - lo) / (hi - lo)) : mix(VIRIDIS, (v - lo) / (hi - lo));
      c.dataset.value = v === null ? "" : String(v);
      c.title = "layer " + c.dataset.layer + ", head " + c.dataset.head + ": " + metricLabel() +
        (diff ? " (edited - baseline)" : " (" + state.run + ")") + " = " + fmt(v);
    });
    document.getElementById("legend-lo").textContent = fmt(lo);
    document.getElementById("legend-hi").textContent = fmt(hi);
    var stops = (diff ? DIVERGING : VIRIDIS).map(function (c) { return "rgb(" + c.join(",") + ")"; });
    document.getElementById("legend-bar").style.background = "linear-gradient(to right," + stops.join(",") + ")";
  }

  function drawHead() {
    if (state.layer === null) return;
    var layer = state.layer, head = state.head, prompt = DATA.prompts[state.prompt];
    var labels = prompt.tokens.map(esc), n = labels.length, ticks = range(n), text = [];
    var panel = document.getElementById("head");
    panel.dataset.layer = layer;
    panel.dataset.head = head;
    cells.forEach(function (c) { c.classList.toggle("selected", +c.dataset.layer === layer && +c.dataset.head === head); });
    document.getElementById("head-title").textContent = "layer " + layer + ", head " + head + " on prompt " + state.prompt;
    for (var i = 0; i < n; i++) {
      text.push(labels.map(function (key, j) { return "query " + i + ": " + labels[i] + "<br>key " + j + ": " + key; }));
    }
    var size = clamp(10 * n + 170, 350, 640), notes = [];
    VIEWS.forEach(function (run) {
      var diff = run === "difference", z = pattern(run, layer, head);
      var sinks = diff ? [] : prompt.runs[run].sinks[layer][head];
      var top = 0;
      z.forEach(function (row) { row.forEach(function (v) { if (v !== null) top = Math.max(top, Math.abs(v)); }); });
      var trace = {
        type: "heatmap", z: z, x: ticks, y: ticks, text: text, hoverongaps: false,
        hovertemplate: "%{text}<br>" + (diff ? "difference" : "weight") + " %{z:." + DATA.decimals + "f}<extra>" + run + "</extra>",
        colorscale: diff ? scale(DIVERGING) : scale(VIRIDIS), zmin: diff ? -Math.max(top, 1 / SCALE) : 0,
        zmax: diff ? Math.max(top, 1 / SCALE) : Math.max(1, top), colorbar: {thickness: 10, len: 0.8},
      };
      var axis = {tickvals: ticks, ticktext: labels, tickfont: {size: n > 32 ? 8 : 10}, showgrid: false, zeroline: false};
      var layout = {
        title: {text: diff ? "edited \u2212 baseline" : run, font: {size: 13}}, width: size + 60, height: size,
        margin: {l: 95, r: 10, t: 32, b: 95}, plot_bgcolor: "#f4f4f4",
        xaxis: Object.assign({title: {text: "key"}, tickangle: -90}, axis),
        yaxis: Object.assign({title: {text: "query"}, autorange: "reversed", scaleanchor: "x"}, axis),
        shapes: sinks.map(function (k) {
          return {type: "rect", xref: "x", yref: "y", x0: k - 0.5, x1: k + 0.5, y0: k - 0.5, y1: n - 0.5,
                  line: {color: SINK_COLOUR, width: 2}};
        }),
      };
      var div = document.getElementById("plot-" + run);
      div.dataset.sinks = sinks.join(",");
      Plotly.react(div, [trace], layout, {displaylogo: false, responsive: false});
      if (!diff) {
        notes.push(run + ": " + (sinks.length ? sinks.map(function (k) { return k + " " + prompt.tokens[k]; }).join(", ") : "none"));
      }
    });
    document.getElementById("sinks").textContent =
      "sink columns (outlined; alpha_k > " + DATA.sink_eps + "): " + notes.join("; ");
    document.getElementById("cell-info").textContent =
      "layer " + layer + ", head " + head + ": " + metricLabel() + " = " +
      VIEWS.map(function (run) { return run + " " + fmt(score(run, layer, head)); }).join(", ");
  }

  function options(select, items) {
    items.forEach(function (item) {
      var o = document.createElement("option");
      o.value = item[0];
      o.textContent = item[1];
      select.appendChild(o);
    });
  }

  var promptSelect = document.getElementById("prompt"), metricSelect = document.getElementById("metric");
  options(promptSelect, DATA.prompts.map(function (p, i) { return [i, i + ": " + p.label]; }));
  options(metricSelect, DATA.metrics.map(function (m) { return [m.key, m.label]; }));
  promptSelect.addEventListener("change", function () { state.prompt = +promptSelect.value; drawGrid(); drawHead(); });
  metricSelect.addEventListener("change", function () { state.metric = metricSelect.value; drawGrid(); drawHead(); });
  document.getElementById("run").addEventListener("change", function (e) { state.run = e.target.value; drawGrid(); });
  cells.forEach(function (c) {
    c.addEventListener("click", function () { state.layer = +c.dataset.layer; state.head = +c.dataset.head; drawHead(); });
  });
  drawGrid();
  document.body.dataset.ready = "1";
})();
