"""Constants of the version 3 wire format, shared by the reader and writer."""

import struct

__all__ = ["MESSAGE_MARKER", "V2_REQUEST_MARKER", "V2_RESPONSE_MARKER", "LENGTH", "MAX_PART_SIZE", "TOO_MANY_CONNECTIONS", "SERVER_DRAINING", "REQUEST_TOO_LARGE", "SERVER_BUSY"]

MESSAGE_MARKER = b"bzr message 3 (bzr 1.6)\n"
V2_REQUEST_MARKER = b"bzr request 2\n"
V2_RESPONSE_MARKER = b"bzr response 2\n"

# The error smartserve answers a connection with when it turns it away
# before reading anything (too many open): nothing the client sent was run.
TOO_MANY_CONNECTIONS = b"TooManyConnections"
# The error a draining smartserve writes as it closes a bzr:// connection
# between requests: nothing the client sent since its last answer was run.
SERVER_DRAINING = b"ServerDraining"
# The error smartserve answers a request with whose body, kept whole for its
# handler, grew past the server's limit: the request was not run.
REQUEST_TOO_LARGE = b"RequestTooLarge"
# The error smartserve answers a request with whose body arrived while request
# bodies held the server's memory limit for all of them: the request was not run.
SERVER_BUSY = b"ServerBusy"

# Every variable-length part is prefixed by its length: 4 bytes, big-endian.
LENGTH = struct.Struct(">L")
# The largest part the length prefix can announce.
MAX_PART_SIZE = (1 << 8 * LENGTH.size) - 1

PART_STATUS = 0x6F  # b"o": one byte follows, S(uccess) or E(rror)
PART_STRUCTURE = 0x73  # b"s": a length-prefixed bencoded structure
PART_BYTES = 0x62  # b"b": a length-prefixed body part
PART_END = 0x65  # b"e": end of message
STATUS_SUCCESS = 0x53
STATUS_ERROR = 0x45
