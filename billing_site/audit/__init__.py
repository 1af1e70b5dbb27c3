"""The audit trail's pages and reads: a record's History, the whole trail, an account's trail
(the triggers and the context that write it: ``billing_site.common.audit``)."""
