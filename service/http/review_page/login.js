/* The review page's login form: POST /review/session {key, reviewer}; the answer sets the HttpOnly session cookie,
   then on to /review (or the /review address the page was left from). No server string is parsed as HTML. */
(() => {
  "use strict";
  const form = document.getElementById("login");
  const error = document.getElementById("login-error");
  const nameInput = document.getElementById("reviewer");

  function target() {
    const next = new URLSearchParams(window.location.search).get("next") || "";
    return /^\/review(\?[^#]*)?$/.test(next) ? next : "/review";  // never off to another page or host
  }

  nameInput.value = window.localStorage.getItem("aoi-review-name") || "";
  (nameInput.value ? document.getElementById("key") : nameInput).focus();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const reviewer = nameInput.value.trim();
    const key = document.getElementById("key").value;
    let response;
    try {
      response = await fetch("/review/session", {
        method: "POST",
        credentials: "same-origin",
        headers: {"Content-Type": "application/json", "Accept": "application/json"},
        body: JSON.stringify({key, reviewer}),
      });
    } catch (exc) {
      error.textContent = "The service did not answer: " + exc;
      return;
    }
    if (response.ok) {
      window.localStorage.setItem("aoi-review-name", reviewer);
      window.location.assign(target());
      return;
    }
    let message = response.status === 401 ? "That key is not accepted." : "Log-in failed (" + response.status + ").";
    try {
      const body = await response.json();
      if (body && typeof body.message === "string" && response.status !== 401) message = body.message;
    } catch (exc) { /* not JSON: keep the status line */ }
    error.textContent = message;
  });
})();
