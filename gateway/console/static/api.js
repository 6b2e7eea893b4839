// Calls to the gateway's own Connect JSON endpoints, with the browser session's credentials.
//
// Credentials live in sessionStorage (this tab, until it closes): an API key typed once,
// sent as "Authorization: Bearer <key>", and in dev mode a tenant, sent as "X-Tenant-Id".
// Behind oauth2-proxy there is nothing to store: the proxy adds the identity itself.

const SERVICE = "/jennah.v1.DeploymentService/";
const KEY = "jennah.apiKey";
const TENANT = "jennah.tenant";
const TIMEOUT_MS = 15000;

/** A failed call: `code` is the Connect code ("not_found", "unauthenticated", ...). */
export class RpcError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}

// What an HTTP status means when the body is not a Connect error (a proxy's own page).
const HTTP_CODES = {
  400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
  404: "unimplemented", 429: "resource_exhausted", 502: "unavailable",
  503: "unavailable", 504: "unavailable",
};

export const session = {
  apiKey: () => sessionStorage.getItem(KEY) || "",
  tenant: () => sessionStorage.getItem(TENANT) || "",
  save({ apiKey, tenant }) {
    if (apiKey !== undefined) store(KEY, apiKey);
    if (tenant !== undefined) store(TENANT, tenant);
  },
  forget() {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(TENANT);
  },
};

function store(name, value) {
  if (value) sessionStorage.setItem(name, value);
  else sessionStorage.removeItem(name);
}

function headers() {
  const h = {
    "Content-Type": "application/json",
    "Connect-Protocol-Version": "1",
    "Connect-Timeout-Ms": String(TIMEOUT_MS),
  };
  const key = session.apiKey();
  const tenant = session.tenant();
  if (key) h.Authorization = `Bearer ${key}`;
  if (tenant) h["X-Tenant-Id"] = tenant;
  return h;
}

/** One unary call: the response message, or a thrown RpcError. */
export async function rpc(method, request = {}) {
  let resp;
  try {
    resp = await fetch(SERVICE + method, {
      method: "POST", headers: headers(), body: JSON.stringify(request),
      credentials: "same-origin", cache: "no-store",
    });
  } catch {
    throw new RpcError("unavailable", "the gateway cannot be reached");
  }
  let body = null;
  try {
    body = await resp.json();
  } catch {
    body = null;
  }
  if (resp.ok && body !== null) return body;
  if (body && typeof body.code === "string") throw new RpcError(body.code, body.message);
  throw new RpcError(HTTP_CODES[resp.status] || "unknown", `HTTP ${resp.status}`);
}
