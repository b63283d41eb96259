"""SMS through Africa's Talking: sender, simulator, templates, delivery reports and inbound keywords."""
