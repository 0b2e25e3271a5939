"""Outbound channel plugins (MLLP, FHIR, SMTP, fax, webhook, SMS, file).

Built in issue 4: each channel implements one small protocol and registers through the
``refloop.channels`` entry-point group. Channels import only protocol code, never the
store, the mapping engine or the runtime.
"""
