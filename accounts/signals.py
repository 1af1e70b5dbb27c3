"""What the accounts app tells whoever listens (it imports no other app): antifraud's signup
checkpoint listens to both. Sent by the API after the creating transaction committed, with the
client IP (the trusted-proxy logic of the throttles)."""

from django.dispatch import Signal

# kwargs: user_id, client_ip
user_signed_up = Signal()
# kwargs: account_id, user_id, client_ip
billing_account_opened = Signal()
