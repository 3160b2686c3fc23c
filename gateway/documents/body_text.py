"""A mail's text as a fax shows it: readable text from an HTML body (tags dropped, blocks kept
as lines) and plain text tidied (one newline convention, no control characters, no runs of blank
lines). Used by gateway/documents/mime.py for bodies and text attachments."""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BODY_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


class _HtmlText(HTMLParser):
    """Readable text from HTML: tags dropped, block boundaries kept as line breaks.

    A block boundary gives at most one line break (Outlook writes every line as its own
    <p>, which would otherwise come out double-spaced); <br> always gives one, so blank
    lines the author made with <br><br> or empty paragraphs survive.
    """

    _SKIP = frozenset({"script", "style", "head", "title", "template"})
    _BLOCK = frozenset(
        {"p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol",
         "blockquote", "pre", "hr", "section", "article", "header", "footer", "address",
         "dl", "dt", "dd", "form", "fieldset", "center"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip_depth = 0
        self._pre_depth = 0
        self._line_start = True

    def _emit(self, text: str) -> None:
        if text:
            self.out.append(text)
            self._line_start = text.endswith("\n")

    def _block(self) -> None:
        if not self._line_start:
            self._emit("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag == "pre":
            self._pre_depth += 1
        if tag == "br":
            self._emit("\n")
        elif tag in self._BLOCK:
            self._block()
        if tag == "li":
            self._emit("- ")
        elif tag in ("td", "th") and not self._line_start:
            self._emit("\t")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self._emit("\n")
        elif tag in self._BLOCK:
            self._block()

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)
        if tag in self._BLOCK:
            self._block()

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if not self._pre_depth:
            data = re.sub(r"[ \t\r\n\f]+", " ", data)
            if self._line_start:
                data = data.lstrip(" ")
        self._emit(data)


def html_to_text(html: str) -> str:
    """Readable plain text from an HTML body, for legacy systems that send only HTML."""
    parser = _HtmlText()
    try:
        parser.feed(html)
        parser.close()
        text = "".join(parser.out)
    except AssertionError:
        # html.parser (via _markupbase) still raises AssertionError on some malformed
        # declarations such as "<![ x ["; fall back to dropping anything tag-shaped.
        text = re.sub(r"[ \t\f]+", " ", unescape(re.sub(r"<[^>]*>", " ", html)))
    return tidy_text(text, strip_lines=True)


def tidy_text(text: str, strip_lines: bool = False) -> str:
    """One newline convention, no control characters, no runs of blank lines.

    HTML indentation is markup, not content, so HTML-derived lines are stripped on both
    sides; plain text keeps its leading spaces (tables in ERP mail line up with them).
    """
    text = _SURROGATE.sub("\ufffd", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _BODY_CONTROL.sub("", text.replace("\xa0", " "))
    out: list[str] = []
    for line in text.split("\n"):
        line = line.strip() if strip_lines else line.rstrip()
        if line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    return "\n".join(out).strip("\n")
