// Copy buttons: a <button data-copy="ID" hidden> copies the text of the element with id ID.
// The buttons stay hidden unless this script runs, so a page without JavaScript shows none
// (its text can still be selected and copied by hand).
(function () {
  "use strict";

  function say(button, text) {
    var label = button.getAttribute("data-label");
    button.textContent = text;
    window.setTimeout(function () { button.textContent = label; }, 2000);
  }

  // Without the clipboard API (plain HTTP, older browsers): select the text and ask the
  // browser to copy the selection; if it will not, the text stays selected for Ctrl+C.
  function copyBySelecting(button, element) {
    var range = document.createRange();
    range.selectNodeContents(element);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    var copied = false;
    try {
      copied = document.execCommand("copy");
    } catch (e) {
      copied = false;
    }
    say(button, copied ? "Copied" : "Selected: press Ctrl+C");
  }

  var buttons = document.querySelectorAll("button[data-copy]");
  Array.prototype.forEach.call(buttons, function (button) {
    var element = document.getElementById(button.getAttribute("data-copy"));
    if (!element) {
      return;
    }
    button.setAttribute("data-label", button.textContent);
    button.hidden = false;
    button.addEventListener("click", function () {
      var text = element.textContent;
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(
          function () { say(button, "Copied"); },
          function () { copyBySelecting(button, element); }
        );
      } else {
        copyBySelecting(button, element);
      }
    });
  });
})();
