"""Wire protocols without I/O: MLLP framing, the HL7 v2 header, acknowledgements."""
