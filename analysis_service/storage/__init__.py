"""The analysis service's database: schema, migrations, queries."""
