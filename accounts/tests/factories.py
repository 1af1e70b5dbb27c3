import factory

from accounts.models import AccountKind, AccountState, BillingAccount, MemberRole, Membership, User


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = User

    email = factory.Sequence(lambda n: f"user{n}@example.test")
    password = factory.django.Password("correct-horse-battery-staple")


class BillingAccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = BillingAccount

    name = factory.Sequence(lambda n: f"Customer {n}")
    email = factory.Sequence(lambda n: f"billing{n}@example.test")
    kind = AccountKind.BUSINESS
    country = "NL"
    currency = "EUR"
    address_line1 = "Herengracht 1"
    address_city = "Amsterdam"
    address_postal_code = "1015 BA"
    state = AccountState.PENDING


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    account = factory.SubFactory(BillingAccountFactory)
    user = factory.SubFactory(UserFactory)
    role = MemberRole.OWNER
