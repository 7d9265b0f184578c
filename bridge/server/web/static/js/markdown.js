"use strict";
// Markdown to safe HTML: marked parses, raw HTML in the text is shown as text (a model
// can be made to print <script>), DOMPurify cleans what marked made, highlight.js
// colours code blocks that name their language. The page's CSP forbids inline script
// besides, so a slip here still could not run code.
const Markdown = (() => {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  marked.use({
    gfm: true,
    breaks: false,
    renderer: {
      html(token) {
        const text = escapeHtml(token.text || token.raw || "");
        return token.block ? `<p>${text}</p>` : text;
      },
    },
  });

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });

  const PURIFY = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe"],
    FORBID_ATTR: ["style", "id", "name"],
  };

  function toHtml(text) {
    return DOMPurify.sanitize(marked.parse(text), PURIFY);
  }

  function highlight(container) {
    for (const code of container.querySelectorAll("pre code[class*='language-']")) {
      const language = code.className.replace(/.*language-(\S+).*/, "$1");
      if (hljs.getLanguage(language)) hljs.highlightElement(code);
    }
  }

  function render(container, text) {
    container.innerHTML = toHtml(text);
    highlight(container);
  }

  return { render, escapeHtml };
})();
