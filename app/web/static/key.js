// The API key form in the page header, on both views. A key is checked against the service
// before it is kept; a key the service later refuses is shown here. Saving a key announces
// itself with a "ligo-key" event on the document, so each view can load what it needs.

import { api, apiKey, onKeyRefused, storeKey } from "./api.js";
import { $ } from "./dom.js";
import { setFieldError } from "./fields.js";

function showKeyState() {
  const key = apiKey();
  $("key-forget").hidden = !key;
  $("api-key-status").textContent = key ? `Key in use (ends …${key.slice(-4)})` : "No key entered";
}

function keyRefused(problem) {
  $("api-key-error").textContent = `The service refused the key: ${problem.detail}`;
  $("api-key").setAttribute("aria-invalid", "true");
}

async function saveKey(event) {
  event.preventDefault();
  $("api-key-error").textContent = "";
  $("api-key").removeAttribute("aria-invalid");
  const key = $("api-key").value.trim();
  if (!key) {
    setFieldError("api-key", "Enter an API key.");
    $("api-key").focus();
    return;
  }
  const previous = apiKey();
  storeKey(key);
  try {
    await api("GET", "/v1/jobs?limit=1");
  } catch (err) {
    storeKey(previous);
    if (err.status !== 401) setFieldError("api-key", err.problem.detail);
    $("api-key").focus();
    showKeyState();
    return;
  }
  $("api-key").value = "";
  showKeyState();
  document.dispatchEvent(new Event("ligo-key"));
}

// Before an action that needs a key: true if there is one, else a message at the key field.
export function requireKey() {
  if (apiKey()) return true;
  $("api-key-error").textContent = "Enter your API key first.";
  $("api-key").setAttribute("aria-invalid", "true");
  $("api-key").focus();
  return false;
}

// `onForget` clears what the page shows with the key (the job list).
export function startKeyForm({ onForget }) {
  onKeyRefused(keyRefused);
  showKeyState();
  $("key-form").addEventListener("submit", saveKey);
  $("key-forget").addEventListener("click", () => {
    storeKey("");
    showKeyState();
    onForget();
    $("api-key").focus();
  });
}
