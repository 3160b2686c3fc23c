"""The report mails' templates: jinja2, the operator's folder (REPORT_TEMPLATE_DIR) first, then
the packaged defaults in gateway/mail/templates/.

One template engine for the project (the dashboard's pages are jinja2 too). HTML templates
(*.html) are autoescaped: a subject, file name or error text that came in by mail cannot become
markup there. Text templates (*.txt) are not escaped. An operator's folder is checked when the
configuration is read (`template_problems`): templates still in the `$name` form of
string.Template (faxgw before jinja2) and templates jinja2 cannot parse are refused at start
(exit 78) with the file and what to change, instead of mailing reports with `$headline` in them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jinja2

# The templates an operator may replace, and the names each one is given.
VARIABLES: dict[str, tuple[str, ...]] = {
    "report.txt": ("headline", "advice", "destination", "subject", "documents", "not_faxed",
                   "pages", "status", "duration", "error", "attempt_count", "attempts",
                   "fax_id", "job_id", "received", "finished", "history"),
    "report.html": ("subject_line", "colour", "headline", "advice", "thumbnail_cid",
                    "thumbnail_alt", "destination", "subject", "documents", "not_faxed",
                    "pages", "status", "duration", "error", "attempt_count", "attempts",
                    "fax_id", "job_id", "received", "finished", "history"),
    "accepted.txt": ("destination", "pages", "job_id"),
    "refused.txt": ("destinations", "reason", "subject"),
}
# What string.Template substituted: $name or ${name}, for the names the old templates had
# (the HTML ones included advice_html, thumbnail_html and attempts_html).
_OLD_NAMES = sorted({n for names in VARIABLES.values() for n in names}
                    | {"advice_html", "thumbnail_html", "attempts_html"})
_OLD_PLACEHOLDER = re.compile(rf"\$(?:\{{({'|'.join(_OLD_NAMES)})\}}|({'|'.join(_OLD_NAMES)})\b)")


@functools.lru_cache(maxsize=8)
def environment(folder: Path | None) -> jinja2.Environment:
    """The templates for `folder` (None: the packaged ones only), compiled once per process;
    an operator's edited file is read again at the next report (auto_reload checks its time).
    The packaged ones do not change while the process runs: not checked (two stat calls a
    report)."""
    loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader("gateway.mail", "templates")]
    if folder is not None:
        loaders.insert(0, jinja2.FileSystemLoader(folder))
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), auto_reload=folder is not None,
                              autoescape=jinja2.select_autoescape(["html"],
                                                                  default_for_string=False),
                              keep_trailing_newline=True)


def template_problems(folder: Path) -> list[str]:
    """What is wrong with the templates in an operator's folder, one line per file."""
    problems = []
    for name in VARIABLES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"REPORT_TEMPLATE_DIR: {path} cannot be read: {exc}")
            continue
        old = sorted({m.group(1) or m.group(2) for m in _OLD_PLACEHOLDER.finditer(text)})
        if old:
            problems.append(
                f"REPORT_TEMPLATE_DIR: {path} is a $name template (string.Template); report "
                f"templates are jinja2 now: write {{{{ {old[0]} }}}} for ${old[0]} "
                f"(found: {', '.join('$' + n for n in old)}; see docs/report-templates.md)")
            continue
        try:
            environment(None).parse(text, name, str(path))
        except jinja2.TemplateSyntaxError as exc:
            problems.append(f"REPORT_TEMPLATE_DIR: {path} line {exc.lineno}: {exc.message}")
    return problems
