"""A file object that counts what is read from it, for tests that bound how
much of a file a parser reads."""

import io


class CountingReader(io.BytesIO):
    """BytesIO recording the bytes read and the largest single request."""

    def __init__(self, data):
        io.BytesIO.__init__(self, data)
        self.bytes_read = 0
        self.largest_request = 0

    def read(self, n=-1):
        self.largest_request = max(self.largest_request, n if n is not None and n >= 0 else 1 << 62)
        chunk = io.BytesIO.read(self, n)
        self.bytes_read += len(chunk)
        return chunk
