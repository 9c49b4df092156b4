"""Request and response bodies of the public API, named as in the references.

Request Structs refuse unknown fields (``forbid_unknown_fields``) and carry
the references' constraints, so decoding is validation and the OpenAPI
document is generated from the same types.
"""
