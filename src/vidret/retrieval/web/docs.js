// A small, self-contained renderer of /openapi.json (the stock Swagger UI loads its assets from a CDN).
"use strict";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function schemaText(schema, components) {
  if (!schema) return "";
  if (schema.$ref) {
    const name = schema.$ref.split("/").pop();
    const target = components[name] || {};
    if (!target.properties) return name;
    const fields = Object.entries(target.properties).map(([k, v]) => `${k}: ${schemaText(v, components)}`);
    return `${name} { ${fields.join(", ")} }`;
  }
  if (schema.anyOf) return schema.anyOf.map((s) => schemaText(s, components)).join(" | ");
  if (schema.type === "array") return `${schemaText(schema.items, components)}[]`;
  return schema.type || "any";
}

fetch("/openapi.json").then((r) => r.json()).then((spec) => {
  const main = document.getElementById("api");
  const components = (spec.components && spec.components.schemas) || {};
  main.appendChild(el("p", spec.info.description || ""));
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = el("section", null, "result");
      sec.style.padding = "10px 14px";
      sec.style.marginBottom = "12px";
      sec.appendChild(el("h3", `${method.toUpperCase()} ${path}`));
      if (op.description || op.summary) sec.appendChild(el("p", op.description || op.summary));
      const params = op.parameters || [];
      if (params.length) {
        const ul = el("ul");
        for (const p of params) {
          ul.appendChild(el("li", `${p.name} (${p.in}${p.required ? ", required" : ""}): ${schemaText(p.schema, components)} ${p.description || (p.schema && p.schema.description) || ""}`));
        }
        sec.appendChild(ul);
      }
      const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
      if (body) sec.appendChild(el("p", `JSON body: ${schemaText(body.schema, components)}`));
      const codes = Object.entries(op.responses || {}).map(([c, r]) => `${c} ${r.description || ""}`);
      sec.appendChild(el("p", `Responses: ${codes.join(" · ")}`));
      main.appendChild(sec);
    }
  }
}).catch((e) => { document.getElementById("status").textContent = `Could not load /openapi.json (${e})`; });
