"""The phrases of the gateway's own mail, through gettext, so that they can be translated.

`gettext.gettext` looks for the catalogue on every call (some twenty `stat`s of candidate
files each time: half a millisecond per report mail); the catalogue is looked up once per
process here instead, with the same domain, directory and language settings.
"""

from __future__ import annotations

import gettext

_DOMAIN = gettext.textdomain()
_ = gettext.translation(_DOMAIN, gettext.bindtextdomain(_DOMAIN), fallback=True).gettext

__all__ = ["_"]
