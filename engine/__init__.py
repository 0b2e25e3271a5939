"""refloop: an HL7 v2 / FHIR R4 interface engine for closed-loop patient referrals."""

__version__ = "0.1.0"
