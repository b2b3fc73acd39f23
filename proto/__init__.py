"""Caffe's protobuf schema (``caffe.proto``) and its generated module ``caffe_pb2``.

``from proto import caffe_pb2`` gives the message classes (NetParameter,
SolverParameter, BlobProto, ...).  After editing caffe.proto run
``python tools/regen_proto.py``.
"""
