"""Wire format: protobuf messages, generated gRPC stubs, tensor codecs."""
