"""Request body parsers of the REST API: DRF's, with a hostile body answered 400.

Python's json module recurses once per nesting level, so `[[[[...]]]]` a few
thousand deep raises RecursionError inside DRF's JSONParser, which DRF does not
catch: a 500 and an ERROR traceback per request, a cheap way to flood the logs.
Here it is a ParseError like any other malformed body (400, `invalid`).
"""

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None
