"""Handing messages over for delivery: email (`delivery.email`: SMTP, or a Maildir folder) and
SMS (`delivery.sms`: one module per provider). The services render what is sent (validation
codes and links, invitations); nothing here imports the services or the HTTP layer.
"""
