// Keyboard shortcuts on the rater page: 1-4 pick an answer, Enter submits, s skips, g guidelines.
(function () {
  const form = document.getElementById("label-form");
  if (!form) return;
  let sent = false;
  // "How much better?" only means something when A or B is better: hidden (and cleared) for
  // tie / both bad.
  const strength = document.getElementById("strength");
  function syncStrength() {
    const picked = form.querySelector('input[name="answer"]:checked');
    const show = !picked || picked.value === "a" || picked.value === "b";
    if (strength) {
      strength.hidden = !show;
      if (!show) strength.querySelectorAll("input").forEach(function (i) { i.checked = false; });
    }
  }
  form.addEventListener("change", syncStrength);
  form.addEventListener("submit", function (e) { if (sent) e.preventDefault(); sent = true; });
  document.addEventListener("keydown", function (e) {
    const t = e.target;
    if (t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type === "text"))) return;
    const radio = form.querySelector('input[name="answer"][data-key="' + e.key + '"]');
    if (radio) { radio.checked = true; syncStrength(); e.preventDefault(); return; }
    if (e.key === "Enter") {
      if (!sent && form.querySelector('input[name="answer"]:checked')) { form.requestSubmit(); }
      e.preventDefault();
    } else if (e.key === "s") {
      document.getElementById("skip-form").requestSubmit();
    } else if (e.key === "g") {
      window.open(document.getElementById("guidelines-link").href, "_blank");
    }
  });
})();
