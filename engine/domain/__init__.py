"""The pure domain core: referral states, canonical events, decisions. Standard library only."""
