"""The SDK's sample applications, reproduced over vsockcompat (vmci-sdk.md section 7)."""
