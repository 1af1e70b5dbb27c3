"""The back office: the staff's pages that span apps (the customer page, search, finance's
money views, the home dashboard), served under /admin/ beside each app's own admin. It reads
through the apps' selectors and writes through their services, like the API."""
