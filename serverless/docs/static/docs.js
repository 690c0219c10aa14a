// The reference page: the whole API first, then each hosted workflow's own document, in Swagger
// UI's top-bar picker. Everything is served by the app itself (no CDN).
"use strict";
(async function () {
  const urls = [{ url: "/api/openapi.json", name: "ComfyUI Serverless API" }];
  try {
    const answer = await fetch("/api/workflows", { headers: authHeaders() });
    if (answer.ok) {
      for (const w of (await answer.json()).workflows) {
        urls.push({ url: `/api/workflows/${encodeURIComponent(w.workflow_id)}/openapi.json`,
                    name: `workflow: ${w.workflow_id}` });
      }
    }
  } catch (e) { /* the whole API's document alone */ }
  window.ui = SwaggerUIBundle({
    urls, dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
    requestInterceptor: (req) => { Object.assign(req.headers, authHeaders()); return req; },
  });
  function authHeaders() {
    const key = sessionStorage.getItem("comfy-serverless-api-key");
    return key ? { Authorization: `Bearer ${key}` } : {};
  }
})();
