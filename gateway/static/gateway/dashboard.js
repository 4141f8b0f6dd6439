// Draws the dashboard's charts from the numbers the page carries (#dashboard-data), in the admin's colours.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("dashboard-data").textContent);
  const style = getComputedStyle(document.documentElement);
  const css = (name, fallback) => (style.getPropertyValue(name) || fallback).trim();
  const fg = css("--body-fg", "#333"), grid = css("--hairline-color", "#e8e8e8");
  const blue = css("--link-fg", "#447e9b"), red = "#ba2121", green = "#2a7d2a";
  Chart.defaults.color = fg;
  Chart.defaults.borderColor = grid;
  Chart.defaults.animation = false;  // read at a glance, and drawn at once for screenshots and tests
  const axes = {y: {beginAtZero: true}};
  window.dashboardCharts = [];
  function draw(id, config) {
    const canvas = document.getElementById(id);
    if (canvas) window.dashboardCharts.push(new Chart(canvas, config));
  }
  draw("chart-traffic", {type: "line", data: {labels: data.labels, datasets: [
    {label: canvasLabel("requests"), data: data.requests, borderColor: blue, backgroundColor: blue, tension: 0.2},
    {label: canvasLabel("errors"), data: data.errors, borderColor: red, backgroundColor: red, tension: 0.2},
    {label: canvasLabel("images"), data: data.images, borderColor: green, backgroundColor: green, tension: 0.2,
     hidden: true},
  ]}, options: {maintainAspectRatio: false, scales: axes, interaction: {mode: "index", intersect: false}}});
  draw("chart-spend", {type: "bar", data: {labels: data.labels, datasets: [
    {label: canvasLabel("spend"), data: data.spend, backgroundColor: blue},
  ]}, options: {maintainAspectRatio: false, scales: axes, plugins: {legend: {display: false}}}});
  for (const name of ["model", "channel", "token", "group"]) {
    const by = data["by_" + name];
    if (!by || !by.labels.length) continue;
    draw("chart-by-" + name, {type: "bar", data: {labels: by.labels, datasets: [
      {label: canvasLabel("spend"), data: by.spend, backgroundColor: blue},
    ]}, options: {indexAxis: "y", maintainAspectRatio: false, plugins: {legend: {display: false}}}});
  }
  function canvasLabel(key) {  // legends in the page's language
    return (data.legend || {})[key] || key;
  }
})();
