// The vidret search page: plain JS, no build step, talks only to this server's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("search-form"), qInput = $("q"), indexSel = $("index"), kSel = $("k");
const statusEl = $("status"), results = $("results");
const player = $("player"), video = $("video"), playerTitle = $("player-title");

function setStatus(text, isError) {
  statusEl.textContent = text;
  statusEl.classList.toggle("error", !!isError);
}

function errorText(body, fallback) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail) && body.detail.length) return body.detail.map((d) => d.msg).join("; ");
  return fallback;
}

async function loadIndexes() {
  const r = await fetch("/indexes");
  const body = await r.json();
  indexSel.textContent = "";
  for (const ix of body.indexes) {
    const opt = document.createElement("option");
    opt.value = ix.name;
    opt.textContent = `${ix.name} (${ix.method}, ${ix.videos} videos)`;
    indexSel.appendChild(opt);
  }
  const wanted = new URLSearchParams(location.search).get("index");
  indexSel.value = wanted && body.indexes.some((ix) => ix.name === wanted) ? wanted : body.default;
  fetch("/health").then((h) => h.json()).then((h) => {
    $("health").textContent = `backbone ${h.backbone} · ${h.videos} videos in ${h.indexes} collection(s)`;
  }).catch(() => {});
}

function card(hit) {
  const li = document.createElement("li");
  li.className = "result";
  li.tabIndex = 0;
  li.dataset.videoId = hit.video_id;
  if (hit.thumbnail_url) {
    const img = document.createElement("img");
    img.className = "strip";
    img.alt = `frames of ${hit.video_id}`;
    img.loading = "lazy";
    img.src = `${hit.thumbnail_url}?n=4`;
    li.appendChild(img);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const name = document.createElement("span");
  name.className = "vid";
  name.textContent = `${hit.rank}. ${hit.video_id}`;
  name.title = hit.video_id;
  const score = document.createElement("span");
  score.className = "score";
  const dur = hit.duration != null ? ` · ${hit.duration.toFixed(1)} s` : "";
  const span = hasSpan(hit) ? ` · ${spanText(hit)}` : "";
  score.textContent = `${hit.score != null ? hit.score.toFixed(3) : "-"}${span}${dur}`;
  meta.append(name, score);
  li.appendChild(meta);
  if (hit.captions && hit.captions.length) {
    const cap = document.createElement("div");
    cap.className = "caption";
    cap.textContent = hit.captions[0];
    li.appendChild(cap);
  }
  const open = () => play(hit);
  li.addEventListener("click", open);
  li.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
  return li;
}

// Windowed indexes (vidret index --segment) and manifest segments give each hit its time range.
function hasSpan(hit) {
  return hit.start != null || hit.end != null;
}

function spanText(hit) {
  const a = hit.start != null ? hit.start.toFixed(1) : "0";
  const b = hit.end != null ? hit.end.toFixed(1) : "end";
  return `${a}–${b} s`;
}

// The media fragment (#t=start,end) makes the browser start at the window and stop at its end.
function mediaUrl(hit) {
  if (!hasSpan(hit)) return hit.video_url;
  const a = hit.start != null ? hit.start : 0;
  return hit.end != null ? `${hit.video_url}#t=${a},${hit.end}` : `${hit.video_url}#t=${a}`;
}

function play(hit) {
  if (!hit.video_url) return;
  video.src = mediaUrl(hit);
  const where = hasSpan(hit) ? `${hit.parent || hit.video_id}, ${spanText(hit)}` : hit.video_id;
  playerTitle.textContent = `${where} (score ${hit.score != null ? hit.score.toFixed(3) : "-"})`;
  player.hidden = false;
  video.play().catch(() => {});
}

function closePlayer() {
  video.pause();
  video.removeAttribute("src");
  video.load();
  player.hidden = true;
}

async function search(ev) {
  if (ev) ev.preventDefault();
  const q = qInput.value.trim();
  if (!q) { setStatus("Type what you are looking for.", true); return; }
  const params = new URLSearchParams({ q, k: kSel.value, index: indexSel.value });
  history.replaceState(null, "", `?${params}`);
  setStatus("Searching…");
  let r, body;
  try {
    r = await fetch(`/search?${params}`);
    body = await r.json();
  } catch (e) {
    setStatus(`The server did not answer (${e}).`, true);
    return;
  }
  results.textContent = "";
  if (!r.ok) { setStatus(errorText(body, `error ${r.status}`), true); return; }
  for (const hit of body.results) results.appendChild(card(hit));
  setStatus(`${body.results.length} result(s) from ${body.index} in ${body.took_ms.toFixed(1)} ms`);
}

form.addEventListener("submit", search);
indexSel.addEventListener("change", () => { if (qInput.value.trim()) search(); });
$("close").addEventListener("click", closePlayer);
player.addEventListener("click", (e) => { if (e.target === player) closePlayer(); });
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !player.hidden) closePlayer(); });

loadIndexes().then(() => {
  const q = new URLSearchParams(location.search).get("q");
  if (q) { qInput.value = q; search(); }
}).catch((e) => setStatus(`Could not list the collections (${e}).`, true));
