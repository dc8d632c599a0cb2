// The console's only script: "Copy" buttons next to once-only secrets. Everything works
// without it (the secret is selectable text); the CSP allows no inline script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.hidden = false;
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      try {
        await navigator.clipboard.writeText(source.textContent.trim());
        button.textContent = "Copied";
      } catch (err) {
        button.textContent = "Select the text and copy it";
      }
    });
  }
});
