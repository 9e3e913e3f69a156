// The console's own script (served from the binary; the CSP allows no inline script).
// Drag and drop onto the upload zone, and keyboard labelling: keys 1-9 pick a value,
// Enter saves and shows the next image.
"use strict";

function setUpDropzone() {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("files");
  if (!zone || !input) return;
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      input.dispatchEvent(new Event("change", { bubbles: true }));
    }
  });
}

document.addEventListener("keydown", (e) => {
  const form = document.querySelector("form.labelling");
  if (!form || e.ctrlKey || e.metaKey || e.altKey) return;
  const target = e.target;
  if (target instanceof HTMLInputElement && target.type !== "radio") return;
  if (target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement) return;
  if (e.key >= "1" && e.key <= "9") {
    const choice = form.querySelector(`input[type=radio][data-key="${e.key}"]`);
    if (choice) {
      choice.checked = true;
      choice.focus();
      e.preventDefault();
    }
  } else if (e.key === "Enter" && form.querySelector("input[type=radio]:checked")) {
    e.preventDefault();
    form.requestSubmit();
  }
});

document.addEventListener("DOMContentLoaded", setUpDropzone);
document.addEventListener("htmx:afterSwap", () => {
  const first = document.querySelector("form.labelling input[autofocus]");
  if (first) first.focus();
});

// The query editor's field list: a click inserts the field's name at the cursor.
document.addEventListener("click", (e) => {
  const button = e.target instanceof Element ? e.target.closest("button.field") : null;
  if (!button) return;
  const editor = button.closest(".editor");
  const area = editor ? editor.querySelector("textarea") : null;
  if (!area) return;
  const name = button.dataset.field;
  const start = area.selectionStart ?? area.value.length;
  const end = area.selectionEnd ?? start;
  area.value = area.value.slice(0, start) + name + area.value.slice(end);
  area.focus();
  area.selectionStart = area.selectionEnd = start + name.length;
});
