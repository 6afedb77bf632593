"""Reading and writing files: protobuf wire and text formats, Caffe models,
qcnn's own model format and images."""
