// The reference page: the whole API first, then each hosted workflow's own document, in Swagger
// UI's top-bar picker. Everything is served by the app itself (no CDN).
// With API_KEYS the whole API's document still loads (it is not a secret); its Authorize control
// takes the key, which is kept in this tab's session storage as the playground keeps it, sent with
// every request, and used to list the hosted workflows' documents (the page reloads once for that).
"use strict";
(async function () {
  const KEY = "comfy-serverless-api-key";
  const urls = [{ url: "/api/openapi.json", name: "ComfyUI Serverless API" }];
  const loadedKey = sessionStorage.getItem(KEY);
  let listed = false;
  try {
    const answer = await fetch("/api/workflows", { headers: authHeaders() });
    if (answer.ok) {
      listed = true;
      for (const w of (await answer.json()).workflows) {
        urls.push({ url: `/api/workflows/${encodeURIComponent(w.workflow_id)}/openapi.json`,
                    name: `workflow: ${w.workflow_id}` });
      }
    }
  } catch (e) { /* the whole API's document alone */ }

  // The key given to Authorize is kept for the tab (and for the playground); Logout forgets it.
  const keepKey = () => ({
    statePlugins: { auth: { wrapActions: {
      authorize: (action) => (payload) => {
        const key = payload && payload.apiKey && payload.apiKey.value;
        if (key) sessionStorage.setItem(KEY, key);
        const result = action(payload);
        if (key && key !== loadedKey && !listed) location.reload();  // now the hosted workflows can be listed
        return result;
      },
      logout: (action) => (payload) => { sessionStorage.removeItem(KEY); return action(payload); },
    } } },
  });

  window.ui = SwaggerUIBundle({
    urls, dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [keepKey],
    layout: "StandaloneLayout",
    requestInterceptor: (req) => { req.headers = { ...authHeaders(), ...req.headers }; return req; },
    onComplete: () => {
      if (loadedKey) window.ui.preauthorizeApiKey("apiKey", loadedKey);  // shown as authorized, sent by "Try it out"
    },
  });

  function authHeaders() {
    const key = sessionStorage.getItem(KEY);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }
})();
