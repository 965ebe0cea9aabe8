"""The transports: gRPC and HTTP/REST framing, their tensor codecs, authentication and the request limit."""
